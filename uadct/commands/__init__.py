"""The ``uadct`` commands, one module per command or group; :mod:`uadct.cli` builds the app from them.

Each command parses its options, calls one library function and prints with rich
(:mod:`~uadct.commands._console`); what the user typed becomes library inputs in
:mod:`~uadct.commands._inputs`. Subject loops live in the library, never here.

=================  ===========================================================
module             commands
=================  ===========================================================
``demo``           ``uadct demo``
``preprocess``     ``uadct preprocess`` (and its summary table)
``train``          ``uadct train``
``models``         ``uadct models``
``score``          ``uadct score``, ``uadct calibrate``
``heatmap``        ``uadct heatmap`` (PNG, HTML page, interactive viewer)
``export``         ``uadct export``
``evaluate``       ``uadct evaluate``
``atlas``          ``uadct atlas fetch|list|path``
``data``           ``uadct data fetch``
=================  ===========================================================
"""
