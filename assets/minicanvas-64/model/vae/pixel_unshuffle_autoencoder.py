"""MiniCanvas's pixel-space autoencoder, written by `saemnesia` from its own class: diffusers
loads it with `StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, without the package."""

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput


class PixelUnshuffleAutoencoder(ModelMixin, ConfigMixin):
    """An exact autoencoder for pixel-space diffusion: latents are the image's 2 x 2 pixel blocks.

    It has the interface the Stable Diffusion pipeline expects of `AutoencoderKL` (`encode`,
    `decode`, `config.scaling_factor`, `config.block_out_channels` for the scale factor).
    """

    @register_to_config
    def __init__(self, factor: int = 2, scaling_factor: float = 1.0, block_out_channels: tuple[int, ...] = (12, 12)):
        super().__init__()
        # One saved buffer gives the model a device, a dtype and a weights file, as diffusers expects.
        self.register_buffer("anchor", torch.zeros(1))

    def encode(self, images: torch.Tensor, return_dict: bool = True):
        latents = F.pixel_unshuffle(images, self.config.factor)
        distribution = DiagonalGaussianDistribution(torch.cat([latents, torch.full_like(latents, -30.0)], dim=1))
        return AutoencoderKLOutput(latent_dist=distribution) if return_dict else (distribution,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True, generator=None):
        images = F.pixel_shuffle(latents, self.config.factor)
        return DecoderOutput(sample=images) if return_dict else (images,)
