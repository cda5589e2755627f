"""uadct: unsupervised anomaly detection in medical volumes (brain MRI, head CT)."""

__version__ = "0.1.0"
