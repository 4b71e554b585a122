"""MiniCanvas's text-to-image model: Stable Diffusion's architecture at a size a CPU can train.

The components are the stock ones (`UNet2DConditionModel`, `CLIPTextModel`, `CLIPTokenizer`,
`DDIMScheduler`) but the autoencoder. Diffusion runs in pixel space: the "autoencoder" is an exact,
parameter-free `pixel_unshuffle` (64 x 64 x 3 images become 32 x 32 x 12 latents), which fits the
pipeline and costs no training. A saved model carries its code in `vae/` (diffusers' custom-component
layout), so `StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it in a
Python that never imported this package. The UNet predicts v on a
cosine schedule: with epsilon-prediction in pixel space, DDIM's first steps amplify the noise
estimate's error a hundredfold (the pipeline turns off x0 clipping), and samples came out as noise.

A `Design` says which UNet draws which `Canvas`, by world name: `DESIGNS["minicanvas"]` (64 x 64, a four-level
UNet whose `up_blocks.1` works on an 8 x 8 grid, as Stable Diffusion's does on 16 x 16).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, ModelMixin, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from saemnesia.hooks import block_grid, hook_points
from saemnesia.minicanvas.data import CANVAS, Canvas

logger = logging.getLogger(__name__)

TEXT_WIDTH = 128


@dataclass(frozen=True)
class Design:
    """A MiniCanvas model's shape: the canvas it draws and its UNet's levels. Latents are the image's pixel blocks
    of `latent_factor` a side (`PixelUnshuffleAutoencoder`; 2 in the shipped design, so the UNet works at half
    the image's size)."""

    canvas: Canvas
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int = 1
    text_layers: int = 2
    latent_factor: int = 2
    train_steps: int = 10_000

    @property
    def latent_size(self) -> int:
        return self.canvas.image_size // self.latent_factor

    @property
    def latent_channels(self) -> int:
        return 3 * self.latent_factor**2


DESIGNS = {
    # Cross-attention at 16 x 16 and 8 x 8 only (at 32 x 32 it would cost most of a step), as Stable Diffusion's
    # coarsest level has none: down (-, attn, attn, -), up (-, attn, attn, -). `up_blocks.1` sits at 8 x 8.
    "minicanvas": Design(
        CANVAS,
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}
"""The shipped designs, by world name."""


def _not_the_expected_vae_type_warning(record: logging.LogRecord) -> bool:
    """diffusers warns at every load that the pipeline's vae is not an `AutoencoderKL`; for MiniCanvas
    that is by design (see `PixelUnshuffleAutoencoder`), so the warning would only alarm users."""
    message = record.getMessage()
    return not (message.startswith("Expected types for vae") and "PixelUnshuffleAutoencoder" in message)


logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(_not_the_expected_vae_type_warning)


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


AUTOENCODER_MODULE = "pixel_unshuffle_autoencoder"
"""The autoencoder's module file in a saved model's `vae/` folder, as `model_index.json` names it."""

_AUTOENCODER_HEADER = '''"""MiniCanvas's pixel-space autoencoder, written by `saemnesia` from its own class: diffusers
loads it with `StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, without the package."""

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
'''


def autoencoder_code() -> str:
    """The autoencoder's module for a model folder: this file's class, so a folder's code never drifts from it."""
    return f"{_AUTOENCODER_HEADER}\n\n{inspect.getsource(PixelUnshuffleAutoencoder)}"


def write_autoencoder_code(folder: Path) -> None:
    """Put the autoencoder's code in `folder/vae/` and name it in `model_index.json` (diffusers records our
    module's import path there, which only a Python that imported the package could resolve)."""
    folder = Path(folder)
    (folder / "vae" / f"{AUTOENCODER_MODULE}.py").write_text(autoencoder_code())
    index = json.loads((folder / "model_index.json").read_text())
    index["vae"] = [AUTOENCODER_MODULE, PixelUnshuffleAutoencoder.__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_tokenizer(canvas: Canvas = CANVAS, max_length: int = 77) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose merges are learned from the world's captions.

    No CLIP vocabulary ships offline, so we learn one: the 512 byte symbols (with and without the
    end-of-word mark) as in CLIP, plus merges that make every word of the world one token. Unknown
    words still tokenize, into byte pieces.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, min_frequency=1, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    bpe.train_from_iterator(canvas.caption_corpus(), trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = max_length
    return tokenizer


def build_components(tokenizer: CLIPTokenizer, design: Design = DESIGNS["minicanvas"], seed: int = 0) -> dict:
    """Freshly initialised components of a MiniCanvas model (the same seed gives the same weights)."""
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=design.text_layers,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=design.latent_size,
        in_channels=design.latent_channels,
        out_channels=design.latent_channels,
        block_out_channels=design.block_out_channels,
        layers_per_block=design.layers_per_block,
        down_block_types=design.down_block_types,
        up_block_types=design.up_block_types,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    return {
        # The pipeline reads its scale factor, 2 ** (levels - 1), from the autoencoder's block widths.
        "vae": PixelUnshuffleAutoencoder(
            factor=design.latent_factor,
            block_out_channels=(design.latent_channels,) * design.latent_factor.bit_length(),
        ),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
    }


def encode_captions(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(ids.input_ids.to(text_encoder.device))[0]


def save_pipeline(components: dict, folder: Path) -> None:
    pipeline = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(folder)
    write_autoencoder_code(folder)


def _optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's moments as flat tensors, so that checkpoints stay safetensors (never pickle)."""
    return {
        f"{index}.{name}": value.reshape(-1) if value.dim() == 0 else value
        for index, state in optimizer.state_dict()["state"].items()
        for name, value in state.items()
    }


def _optimizer_state_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict:
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    state_dict["state"] = state
    return state_dict


class DrawnBatches(torch.utils.data.IterableDataset):
    """Training batches `(step, pixels, captions)` for steps [start, stop), each drawn from its step's seed. Under a
    `DataLoader` with workers, worker w draws steps w, w + workers, ...; the loader takes them in turn, so the order
    and the data are those of one process: drawing moves to other cores (on a GPU it would be most of a step)."""

    def __init__(self, canvas: Canvas, batch_size: int, seed: int, start: int, stop: int):
        self.canvas, self.batch_size, self.seed, self.start, self.stop = canvas, batch_size, seed, start, stop

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        first, every = (worker.id, worker.num_workers) if worker else (0, 1)
        for step in range(self.start + first, self.stop, every):
            pixels, captions, _, _ = self.canvas.sample_batch(self.batch_size, seed=batch_seed(self.seed, step))
            yield step, torch.from_numpy(pixels), captions


def batch_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def diffusion_loss(
    components: dict,
    design: Design,
    pixels: torch.Tensor,
    captions: list[str],
    seed: int,
    noise_scheduler: DDPMScheduler,
    min_snr_gamma: float,
    device: str,
) -> torch.Tensor:
    """The v-prediction loss of one drawn batch, its noise and timesteps deterministic from `seed`."""
    batch_size = len(pixels)
    generator = torch.Generator().manual_seed(seed)
    latents = F.pixel_unshuffle(pixels, design.latent_factor).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    timesteps = timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    text = encode_captions(components["tokenizer"], components["text_encoder"], captions)
    prediction = components["unet"](noisy, timesteps, text).sample
    target = noise_scheduler.get_velocity(latents, noise, timesteps)
    loss = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:  # Min-SNR weighting for v-prediction: low-noise steps stop dominating the loss
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        loss = loss * torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
    return loss.mean()


CANDIDATE_DESIGNS = {
    "minicanvas": DESIGNS["minicanvas"],
    # 4 x 4 pixel blocks as 48-channel latents on 16 x 16: the grids of the first world, at twice the image size.
    "patches-4, attention at 16 and 8": Design(
        CANVAS,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        latent_factor=4,
    ),
    "patches-4, attention at 8 and 4": Design(
        CANVAS,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        latent_factor=4,
    ),
}
"""The designs measured before choosing MiniCanvas's (`step_seconds`); the first is the one trained."""


def step_seconds(design: Design, batch_size: int = 48, repeats: int = 5) -> dict:
    """Median seconds of one training step (drawing, forward, backward, AdamW) and of one guided sampling call
    of a batch of 4, for a freshly initialised model of `design`; its UNet's size and token grids."""
    components = build_components(build_tokenizer(design.canvas), design)
    trainable = [*components["unet"].parameters(), *components["text_encoder"].parameters()]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
    train_times = []
    for repeat in range(repeats + 1):  # the first step warms up and is not counted
        began = time.perf_counter()
        pixels, captions, _, _ = design.canvas.sample_batch(batch_size, seed=repeat)
        loss = diffusion_loss(
            components, design, torch.from_numpy(pixels), captions, repeat, noise_scheduler, 5.0, "cpu"
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_times.append(time.perf_counter() - began)
    unet = components["unet"]
    latents = torch.randn(8, design.latent_channels, design.latent_size, design.latent_size)
    text = torch.randn(8, 77, TEXT_WIDTH)
    sample_times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            began = time.perf_counter()
            unet(latents, torch.full((8,), 500), text)
            sample_times.append(time.perf_counter() - began)
    size = design.latent_size
    grids = {name: block_grid(unet, name, size, size)[0] for name in hook_points(unet) if name.startswith("up_")}
    return {
        "train_step_s": round(sorted(train_times[1:])[repeats // 2], 3),
        "guided_call_of_4_s": round(sorted(sample_times[1:])[repeats // 2], 4),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "up_block_grids": grids,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
    }


def train_model(
    out: Path,
    checkpoint: Path,
    steps: int | None = None,
    batch_size: int = 48,
    learning_rate: float = 1e-3,
    seed: int = 0,
    checkpoint_every: int = 250,
    device: str = "cpu",
    text_length: int = 77,
    min_snr_gamma: float = 5.0,
    design: Design = DESIGNS["minicanvas"],
    workers: int = 0,
) -> Path:
    """Train the UNet and the text encoder together, from scratch, on freshly drawn batches.

    Resumable: a checkpoint (weights, EMA, optimiser, step) is written every `checkpoint_every`
    steps to `checkpoint`, and a rerun of the same command continues from it. Batches are drawn
    from `seed` and the step number, so a resumed run sees the same data as an uninterrupted one.
    The EMA weights are saved, at every checkpoint, as a diffusers pipeline in `out`. `workers` processes draw
    the batches ahead (`DrawnBatches`), the same batches as without them. A checkpoint that keeps only the
    weights (no `optimizer.safetensors`) resumes with fresh Adam moments.
    """
    steps = steps or design.train_steps
    tokenizer = build_tokenizer(design.canvas, text_length)
    components = build_components(tokenizer, design, seed)
    unet, text_encoder = components["unet"].to(device), components["text_encoder"].to(device)
    trainable = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.01)
    warmup = 200

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup)))) * 0.95 + 0.05

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ema = EMAModel(trainable, decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)

    start, elapsed = 0, 0.0
    if (checkpoint / "state.json").exists():
        state = json.loads((checkpoint / "state.json").read_text())
        unet.load_state_dict(load_file(checkpoint / "unet.safetensors"))
        text_encoder.load_state_dict(load_file(checkpoint / "text_encoder.safetensors"))
        ema_weights = load_file(checkpoint / "ema.safetensors")
        for shadow, index in zip(ema.shadow_params, range(len(ema.shadow_params))):
            shadow.copy_(ema_weights[str(index)])
        ema.optimization_step = state["step"]
        if (checkpoint / "optimizer.safetensors").exists():  # absent where only the weights were kept
            optimizer.load_state_dict(
                _optimizer_state_from_tensors(optimizer, load_file(checkpoint / "optimizer.safetensors"))
            )
        lr_schedule.last_epoch = state["step"]
        start, elapsed = state["step"], state["elapsed_s"]
        logger.info("resumed at step %d", start)

    began = time.time() - elapsed
    batches = DrawnBatches(design.canvas, batch_size, seed, start, steps)
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None
    )
    for step, pixels, captions in loader:
        loss = diffusion_loss(
            components, design, pixels, captions, batch_seed(seed, step), noise_scheduler, min_snr_gamma, device
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(trainable)
        if step % 25 == 0 or step == steps - 1:
            logger.info(
                "step %d/%d loss %.4f lr %.2e %.1f s",
                step + 1,
                steps,
                loss.item(),
                lr_schedule.get_last_lr()[0],
                time.time() - began,
            )
        if (step + 1) % checkpoint_every == 0 or step == steps - 1:
            checkpoint.mkdir(parents=True, exist_ok=True)
            save_file(unet.state_dict(), checkpoint / "unet.safetensors")
            save_file(
                {k: v.contiguous() for k, v in text_encoder.state_dict().items()},
                checkpoint / "text_encoder.safetensors",
            )
            save_file({str(i): p for i, p in enumerate(ema.shadow_params)}, checkpoint / "ema.safetensors")
            save_file(_optimizer_state_to_tensors(optimizer), checkpoint / "optimizer.safetensors")
            (checkpoint / "state.json").write_text(json.dumps({"step": step + 1, "elapsed_s": time.time() - began}))
            ema.store(trainable)
            ema.copy_to(trainable)
            save_pipeline({**components, "unet": unet, "text_encoder": text_encoder}, out)
            ema.restore(trainable)
    return out
