"""GANomaly (Akcay et al. 2018) with the settings of Madzia-Madzou & Kuijf 2022.

Generator: encoder ``G_E`` (x -> z), decoder ``G_D`` (z -> x_hat), second encoder
``E`` (x_hat -> z_hat). Discriminator ``D`` gives a real/fake logit and its last
hidden feature map ``f(.)``. All are DCGAN pyramids (4x4 convolutions of stride 2,
batch norm, leaky ReLU) from ``P`` down to 4 (``P`` a power of two >= 8: 16 and 32 in
the paper), then a 4x4 convolution to the latent vector (100 by default). The
decoder's last layer is linear (no tanh) so any intensity scale can be reconstructed.

Generator loss (the papers' ``||.||_1`` / ``||.||_2`` as means, as in the reference
code): ``w_adv * mean((f(x) - f(x_hat))^2) + w_con * mean_mask(|x - x_hat|)
+ w_enc * mean((z - z_hat)^2)`` with weights 1/70/10; the contextual term counts only
voxels inside the brain mask. Discriminator: binary cross-entropy of real and
reconstructed patches, averaged (or, optionally, the Wasserstein loss with gradient
penalty, ``adversarial_loss="wgan-gp"``).

Score ("modified anomaly score", van Hespen et al. 2021): the per-element encoder
error ``e_k = (z_k - z_hat_k)^2`` is normalised by the median and the median
absolute deviation of that element over training patches, ``(e_k - median_k) /
MAD_k``, then averaged over the latent elements. The statistics are buffers.

With ``position_conditioning`` the decoder is conditional: the patch centre ``(B, 3)``
(normalised atlas coordinates) is concatenated to ``z`` before decoding; both encoders
see images only, so the encoder error measures how far the patch is from what is
normal *at that place*.

The DCGAN building blocks and :func:`gradient_penalty` are shared with f-AnoGAN; the
loss, score and normalisation code is shared with progressive GANomaly, which overrides
only the networks (:meth:`GANomaly.build_networks`, :meth:`reconstruct`,
:meth:`discriminate`) and the resolution hooks (:meth:`prepare`, :meth:`expand`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from uadct.errors import UadctError
from uadct.models.base import AnomalyModel, ModelConfig, median_and_mad
from uadct.models.layers import POSITION_FEATURES, conv_layer, deconv_layer, norm_layer

BOTTOM_SIZE = 4  # voxels per side where the pyramids meet the 4x4 latent convolution


# --------------------------------------------------------------------------------------
# DCGAN building blocks (shared with f-AnoGAN)
# --------------------------------------------------------------------------------------


def pyramid_levels(patch_size: int) -> int:
    """Number of stride-2 levels from ``patch_size`` down to 4 (a power of two >= 8)."""
    if patch_size < 2 * BOTTOM_SIZE or patch_size & (patch_size - 1):
        raise UadctError(f"GAN models need a patch size that is a power of two >= 8 (16 or 32 in the papers); got {patch_size}")
    return int(math.log2(patch_size // BOTTOM_SIZE))


def conv_pyramid(dims: int, in_channels: int, base_channels: int, patch_size: int, batch_norm: bool = True) -> tuple[nn.Sequential, int]:
    """``(B, C, P, P) -> (B, c_top, 4, 4)`` strided convolutions; returns the stack and ``c_top``.

    The first block has no normalisation (DCGAN); ``batch_norm=False`` drops it everywhere
    (a WGAN-GP critic must not mix samples through batch statistics).
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for level in range(pyramid_levels(patch_size)):
        out = base_channels * 2**level
        layers.append(conv_layer(dims)(channels, out, 4, 2, 1, bias=not (batch_norm and level > 0)))
        if batch_norm and level > 0:
            layers.append(norm_layer(dims)(out))
        layers.append(nn.LeakyReLU(0.2))
        channels = out
    return nn.Sequential(*layers), channels


def deconv_pyramid(dims: int, latent_dim: int, base_channels: int, patch_size: int, out_channels: int) -> nn.Sequential:
    """``(B, latent, 1, 1) -> (B, out, P, P)``: 4x4 projection, then stride-2 transposed convolutions.

    Batch norm + ReLU between layers; the output layer is linear.
    """
    levels = pyramid_levels(patch_size)
    channels = base_channels * 2 ** (levels - 1)
    layers: list[nn.Module] = [deconv_layer(dims)(latent_dim, channels, BOTTOM_SIZE, 1, 0, bias=False), norm_layer(dims)(channels), nn.ReLU()]
    for _ in range(levels - 1):
        layers += [deconv_layer(dims)(channels, channels // 2, 4, 2, 1, bias=False), norm_layer(dims)(channels // 2), nn.ReLU()]
        channels //= 2
    layers.append(deconv_layer(dims)(channels, out_channels, 4, 2, 1))
    return nn.Sequential(*layers)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: convolutions N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm3d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class LatentEncoder(nn.Module):
    """``(B, C, *patch) -> (B, latent)``: conv pyramid + 4x4 convolution to the latent vector."""

    def __init__(self, dims: int, in_channels: int, base_channels: int, patch_size: int, latent_dim: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.features, channels = conv_pyramid(dims, in_channels, base_channels, patch_size, batch_norm)
        self.to_latent = conv_layer(dims)(channels, latent_dim, BOTTOM_SIZE, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_latent(self.features(x)).flatten(1)


class PatchDecoder(nn.Module):
    """``(B, latent) -> (B, C, *patch)``."""

    def __init__(self, dims: int, out_channels: int, base_channels: int, patch_size: int, latent_dim: int) -> None:
        super().__init__()
        self.dims = dims
        self.layers = deconv_pyramid(dims, latent_dim, base_channels, patch_size, out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z.view(z.shape + (1,) * self.dims))


class Discriminator(nn.Module):
    """``(B, C, *patch) -> (logit (B,), features (B, n_d))``; features = last hidden layer, flattened."""

    def __init__(self, dims: int, in_channels: int, base_channels: int, patch_size: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.features, channels = conv_pyramid(dims, in_channels, base_channels, patch_size, batch_norm)
        self.classifier = conv_layer(dims)(channels, 1, BOTTOM_SIZE, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.classifier(features).flatten(), features.flatten(1)


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    mixing: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP penalty ``mean_i (||grad_x critic(x_i)||_2 - 1)^2`` at ``x_i = a_i real_i + (1 - a_i) fake_i``.

    ``critic`` maps ``(B, ...)`` to ``(B,)``; ``mixing`` ``(B,)`` holds the ``a_i``
    (uniform on [0, 1) when not given). Unweighted: the caller multiplies by lambda.
    The graph is kept so the penalty can be back-propagated into the critic.
    """
    if mixing is None:
        mixing = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    mixing = mixing.view((-1,) + (1,) * (real.dim() - 1))
    between = (mixing * real.detach() + (1 - mixing) * fake.detach()).requires_grad_(True)
    (gradient,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
    return (gradient.flatten(1).norm(2, dim=1) - 1).square().mean()


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Stop gradients into the modules' parameters (inputs still get gradients)."""
    parameters = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(parameters, flags):
            p.requires_grad_(flag)


def masked_mean(values: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the voxels where ``masks`` is 1 (all voxels when None); a scalar."""
    if masks is None:
        return values.mean()
    return (values * masks).sum() / masks.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class GANomalyConfig(ModelConfig):
    """GANomaly hyper-parameters (Madzia-Madzou & Kuijf 2022; the original used 1/50/1 weights)."""

    latent_dim: int = 100  # size of z
    base_channels: int = 64  # channels of the first pyramid level, doubled per level
    weight_adversarial: float = 1.0  # w_adv: feature matching ||f(x) - f(x_hat)||^2
    weight_contextual: float = 70.0  # w_con: masked L1 ||x - x_hat||
    weight_encoder: float = 10.0  # w_enc: ||z - z_hat||^2
    adversarial_loss: str = "bce"  # "bce" (paper) or "wgan-gp" (Wasserstein critic + gradient penalty)
    gradient_penalty_weight: float = 10.0  # lambda, "wgan-gp" only
    adam_beta1: float = 0.5  # Adam beta1 of both optimisers
    adam_beta2: float = 0.999  # Adam beta2 of both optimisers
    reinit_discriminator_below: float = 1e-5  # reference code: restart D when its BCE loss collapses ("bce" only; 0 = never)
    statistics_batch_size: int = 1024  # patches per forward pass when fitting the median/MAD


ADVERSARIAL_LOSSES = ("bce", "wgan-gp")
MAD_FLOOR = 1e-12  # a latent element whose training errors never vary is divided by this, not by 0


class GANomaly(AnomalyModel):
    name = "ganomaly"
    summary = "GANomaly (encoder-decoder-encoder GAN); score = encoder loss, median/MAD normalised per latent element"
    outputs = ("scalar", "voxel")
    Config = GANomalyConfig
    supports_positions = True

    def __init__(self, config: GANomalyConfig) -> None:
        super().__init__(config)
        if config.adversarial_loss not in ADVERSARIAL_LOSSES:
            raise UadctError(f"{self.name}: adversarial_loss must be one of {list(ADVERSARIAL_LOSSES)}, got {config.adversarial_loss!r}")
        self.build_networks()
        self.apply(dcgan_init)
        # Fitted by fit_statistics; the identity normalisation until then.
        self.register_buffer("score_median", torch.zeros(config.latent_dim))
        self.register_buffer("score_mad", torch.ones(config.latent_dim))

    def build_networks(self) -> None:
        """``encoder`` (G_E), ``decoder`` (G_D), ``second_encoder`` (E) and ``discriminator`` (D)."""
        config = self.config
        dims, channels, base, size, latent = config.dims, config.in_channels, config.base_channels, config.patch_size, config.latent_dim
        self.encoder = LatentEncoder(dims, channels, base, size, latent)
        self.decoder = PatchDecoder(dims, channels, base, size, self.decoder_inputs)
        self.second_encoder = LatentEncoder(dims, channels, base, size, latent)
        self.discriminator = Discriminator(dims, channels, base, size, batch_norm=config.adversarial_loss == "bce")

    @property
    def decoder_inputs(self) -> int:
        """Length of the decoder's input: the latent code, plus the patch centre when conditioned."""
        return self.config.latent_dim + (POSITION_FEATURES if self.config.position_conditioning else 0)

    def generator_modules(self) -> list[nn.Module]:
        return [self.encoder, self.decoder, self.second_encoder]

    def condition(self, z: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """The decoder input: ``z (B, L)``, with the patch centres ``(B, 3)`` appended when conditioned."""
        if not self.uses_positions:
            return z
        return torch.cat([z, self.require_positions(positions, len(z)).to(z.dtype)], dim=1)

    def prepare(self, patches: torch.Tensor, masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The networks' input and mask from engine patches ``(B, C, *patch)``: unchanged here
        (progressive GANomaly brings them to its current resolution)."""
        return patches, masks

    def expand(self, x_hat: torch.Tensor) -> torch.Tensor:
        """A reconstruction back on the patch grid (the inverse resolution hook of :meth:`prepare`)."""
        return x_hat

    def discriminate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``D(x)``: logit ``(B,)`` and features ``(B, n_d)``."""
        return self.discriminator(x)

    def reconstruct(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x (B, C, *patch) -> z (B, L), x_hat (B, C, *patch), z_hat (B, L)``."""
        z = self.encoder(x)
        x_hat = self.decoder(self.condition(z, positions))
        return z, x_hat, self.second_encoder(x_hat)

    def generator_losses(
        self,
        x: torch.Tensor,
        masks: torch.Tensor | None = None,
        reconstruction: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Scalar losses ``adv``, ``con`` (inside the mask), ``enc`` and their weighted sum ``loss``
        for network inputs ``x`` (after :meth:`prepare`)."""
        config = self.config
        z, x_hat, z_hat = reconstruction if reconstruction is not None else self.reconstruct(x, positions)
        with torch.no_grad():
            real_features = self.discriminate(x)[1]
        adv = (real_features - self.discriminate(x_hat)[1]).square().mean()
        con = masked_mean((x - x_hat).abs(), masks)
        enc = (z - z_hat).square().mean()
        loss = config.weight_adversarial * adv + config.weight_contextual * con + config.weight_encoder * enc
        return {"loss": loss, "adv": adv, "con": con, "enc": enc}

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """BCE of real (label 1) and reconstructed (label 0) patches, averaged; or the WGAN-GP critic loss."""
        real_logit = self.discriminate(x)[0]
        fake_logit = self.discriminate(x_hat.detach())[0]
        if self.config.adversarial_loss == "wgan-gp":
            penalty = gradient_penalty(lambda v: self.discriminate(v)[0], x, x_hat)
            return fake_logit.mean() - real_logit.mean() + self.config.gradient_penalty_weight * penalty
        real = F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
        fake = F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
        return 0.5 * (real + fake)

    def training_loss(
        self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        x, masks = self.prepare(patches, masks)
        return self.generator_losses(x, masks, positions=positions)

    def configure_optimizers(self, learning_rate: float) -> dict[str, torch.optim.Optimizer]:
        betas = (self.config.adam_beta1, self.config.adam_beta2)
        generator = [p for m in self.generator_modules() for p in m.parameters()]
        return {
            "generator": torch.optim.Adam(generator, lr=learning_rate, betas=betas),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=learning_rate, betas=betas),
        }

    def training_step(
        self, patches: torch.Tensor, masks: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer],
        positions: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One generator update (D frozen), then one discriminator update on the same reconstructions."""
        patches, masks = self.prepare(patches, masks)
        reconstruction = self.reconstruct(patches, positions)
        with frozen(self.discriminator):
            losses = self.generator_losses(patches, masks, reconstruction)
        optimizers["generator"].zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizers["generator"].step()

        disc = self.discriminator_loss(patches, reconstruction[1])
        optimizers["discriminator"].zero_grad(set_to_none=True)
        disc.backward()
        optimizers["discriminator"].step()
        if self.config.adversarial_loss == "bce" and float(disc.detach()) < self.config.reinit_discriminator_below:
            self.discriminator.apply(dcgan_init)
        return {**{k: float(v.detach()) for k, v in losses.items()}, "disc": float(disc.detach())}

    def validation_loss(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> float:
        """``w_con * con + w_enc * enc``: the generator loss without the adversarial term.

        The adversarial term is measured with the current discriminator, which changes
        every epoch, so it is not comparable across epochs; the weighted contextual and
        encoder terms depend on the generator only and are what the score relies on.
        """
        losses = self.training_loss(patches, masks, positions)
        return float((self.config.weight_contextual * losses["con"] + self.config.weight_encoder * losses["enc"]).detach())

    def encoder_errors(self, patches: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-element encoder errors ``(z - z_hat)^2`` ``(B, L)`` and the reconstruction ``x_hat``
        on the patch grid, for engine patches ``(B, C, *patch)``."""
        x, _ = self.prepare(patches, None)
        z, x_hat, z_hat = self.reconstruct(x, positions)
        return (z - z_hat).square(), self.expand(x_hat)

    def encode_features(self, patches: torch.Tensor) -> torch.Tensor:
        """The first encoder's code ``z = G_E(x)`` ``(B, L)`` (forest scorer features)."""
        return self.encoder(self.prepare(patches, None)[0])

    def fit_statistics(self, patches: torch.Tensor, masks: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Median and MAD of each latent element's error over the training patches -> buffers."""
        step = self.config.statistics_batch_size
        errors = torch.cat([
            self.encoder_errors(patches[i : i + step], None if positions is None else positions[i : i + step])[0]
            for i in range(0, len(patches), step)
        ])
        median, mad = median_and_mad(errors.double())
        self.score_median.copy_(median)
        self.score_mad.copy_(mad)

    def normalise(self, errors: torch.Tensor) -> torch.Tensor:
        """Modified anomaly score: ``mean_k (e_k - median_k) / MAD_k`` for errors ``(B, L)`` -> ``(B,)``."""
        return ((errors - self.score_median) / self.score_mad.clamp_min(MAD_FLOOR)).mean(1)

    def score_patches(
        self, patches: torch.Tensor, masks: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``scalar`` (B,) normalised encoder loss, ``voxel`` (B, *patch) |x - x_hat|, ``raw`` (B,) encoder loss."""
        errors, x_hat = self.encoder_errors(patches, positions)
        voxel = (patches - x_hat).abs()
        if masks is not None:
            voxel = voxel * masks
        return {"scalar": self.normalise(errors), "voxel": voxel[:, 0], "raw": errors.mean(1)}
