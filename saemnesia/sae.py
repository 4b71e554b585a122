"""A TopK sparse autoencoder in EleutherAI sparsify's checkpoint layout.

A checkpoint is a folder with `cfg.json` (sparsify's `SparseCoderConfig` fields plus `d_in`) and
`sae.safetensors` (`encoder.weight [L, d]`, `encoder.bias [L]`, `W_dec [L, d]`, `b_dec [d]`), so the
published SAeUron and SAEmnesia checkpoints load as they are, and ours load in sparsify.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
UNSUPPORTED_SWITCHES = ("signed", "batch_topk", "sample_topk", "input_unit_norm")
HOOK_PREFIX = "unet."
"""SAeUron names its folders by the pipeline's module path (`unet.up_blocks.1.attentions.1`); ours by the UNet's."""


class SaeLoadError(ValueError):
    """A checkpoint that cannot be used; the message names the problem and the fix."""


@dataclass
class SaeConfig:
    """sparsify's `SparseCoderConfig` fields with the input width; round-trips to `cfg.json`."""

    d_in: int
    num_latents: int
    k: int = 32
    activation: str = "topk"
    expansion_factor: int = 0
    normalize_decoder: bool = True
    multi_topk: bool = False
    skip_connection: bool = False
    transcode: bool = False

    @classmethod
    def from_json_dict(cls, raw: dict, source: str = CONFIG_FILE) -> SaeConfig:
        """Read a sparsify `cfg.json`; unknown keys (other sparsify versions) are ignored."""
        if not isinstance(raw, dict):
            raise SaeLoadError(f"{source} must hold a JSON object, found {type(raw).__name__}.")
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in raw.items() if key in known}
        d_in, expansion_factor = raw.get("d_in"), raw.get("expansion_factor")
        if not values.get("num_latents") and isinstance(d_in, int) and isinstance(expansion_factor, int):
            values["num_latents"] = d_in * expansion_factor
        missing = [key for key in ("d_in", "num_latents", "k") if not values.get(key)]
        if missing:
            raise SaeLoadError(
                f"{source} lacks {', '.join(missing)} (needs d_in, k and num_latents or expansion_factor); "
                "it is not a sparsify SAE config."
            )
        for key in ("d_in", "num_latents", "k"):
            if isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] <= 0:
                raise SaeLoadError(f"{source}: {key} must be a positive integer, found {values[key]!r}.")
        if values["k"] > values["num_latents"]:
            raise SaeLoadError(f"{source}: k = {values['k']} exceeds num_latents = {values['num_latents']}.")
        if values.get("activation", "topk") != "topk" or values.get("skip_connection") or values.get("transcode"):
            raise SaeLoadError(
                f"{source}: only plain TopK autoencoders are supported (no groupmax, skip or transcoder)."
            )
        # Switches of older sparsify versions and of SAeUron's fork that change what encoding means.
        other_encodings = [key for key in UNSUPPORTED_SWITCHES if raw.get(key)]
        if other_encodings:
            raise SaeLoadError(
                f"{source}: {', '.join(other_encodings)} set; only per-token TopK on the raw input is supported."
            )
        return cls(**values)


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """The k largest ReLU activations of each input, [..., k]."""
    top_indices: Tensor
    """Their latent indices, [..., k]."""
    pre_acts: Tensor | None
    """The dense pre-activations W_enc (x - b_dec) + b_enc, [..., L], when asked for."""


class Sae(nn.Module):
    """TopK SAE: `z = TopK(ReLU(W_enc (x - b_dec) + b_enc))`, `x_hat = W_dec^T z + b_dec`."""

    def __init__(self, cfg: SaeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.d_in, cfg.num_latents)
        self.encoder.bias.data.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.normalize_decoder:
            self.normalize_decoder()

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    def pre_activations(self, x: Tensor) -> Tensor:
        return nn.functional.linear(
            x.to(self.encoder.weight.dtype) - self.b_dec, self.encoder.weight, self.encoder.bias
        )

    def encode(self, x: Tensor, return_pre_acts: bool = False) -> EncoderOutput:
        pre_acts = self.pre_activations(x)
        top_acts, top_indices = torch.topk(torch.relu(pre_acts), self.cfg.k, dim=-1, sorted=False)
        return EncoderOutput(top_acts, top_indices, pre_acts if return_pre_acts else None)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Sum of the k selected decoder rows: touches only those rows, never the whole dictionary."""
        return torch.einsum("...k,...kd->...d", top_acts, self.W_dec[top_indices]) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        encoded = self.encode(x)
        return self.decode(encoded.top_acts, encoded.top_indices)

    def error(self, x: Tensor) -> Tensor:
        """What the SAE misses, `x - x_hat`: kept by the erasure edit so an empty edit is exact."""
        return x - self(x)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Sae:
        """Load a sparsify-layout folder, checking every file, key and shape with a clear error.

        `dtype` is the one it computes in: float32 to train and take statistics, the UNet's own to edit
        a generation (see `Studio.load`)."""
        folder = Path(folder)
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise SaeLoadError(
                    f"No {path.name} in SAE folder '{folder}': give a folder holding cfg.json and sae.safetensors."
                )
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SaeLoadError(f"{config_path} is not valid JSON ({error}).") from error
        cfg = SaeConfig.from_json_dict(raw, str(config_path))
        try:
            tensors = load_file(weights_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise SaeLoadError(f"{weights_path} is not a readable safetensors file ({error}).") from error
        expected = {
            "encoder.weight": (cfg.num_latents, cfg.d_in),
            "encoder.bias": (cfg.num_latents,),
            "W_dec": (cfg.num_latents, cfg.d_in),
            "b_dec": (cfg.d_in,),
        }
        for name, shape in expected.items():
            if name not in tensors:
                raise SaeLoadError(f"{weights_path} lacks tensor '{name}' (has {sorted(tensors)}).")
            if tuple(tensors[name].shape) != shape:
                raise SaeLoadError(
                    f"{weights_path}: '{name}' has shape {tuple(tensors[name].shape)}, cfg.json says {shape}."
                )
        sae = cls(cfg)
        sae.load_state_dict({name: tensors[name].float() for name in expected})
        return sae.to(device, dtype)


def load_sae(
    source: str | Path,
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Sae:
    """Load an SAE from a local folder, or from a hub repository id (`bcywinski/SAeUron`, `leno3003/SAEmnesia`).

    `subfolder` is the hook point (`up_blocks.1.attentions.1`). SAeUron keeps one folder per hook point,
    named with the pipeline's `unet.` prefix; both spellings are found. SAEmnesia keeps its one SAE (the
    object SAE, trained on up.1.1) at the repository's root, so a root holding `cfg.json` is used when
    no hook-point folder exists. Hub downloads need a network; local folders never do.
    """
    names = list(dict.fromkeys([subfolder, HOOK_PREFIX + subfolder.removeprefix(HOOK_PREFIX)])) if subfolder else []
    root = Path(source)
    if not root.exists() and "/" in str(source) and not str(source).startswith((".", "/")):
        from huggingface_hub import snapshot_download

        patterns = [f"{name}/*" for name in names] + [CONFIG_FILE, WEIGHTS_FILE] if names else None
        root = Path(snapshot_download(str(source), allow_patterns=patterns))
    if not root.is_dir():
        raise SaeLoadError(f"SAE folder '{root}' does not exist: give a sparsify folder or a hub id.")
    folder = next((root / name for name in names if (root / name / CONFIG_FILE).is_file()), root)
    if names and not (folder / CONFIG_FILE).is_file():
        raise SaeLoadError(
            f"No SAE for {subfolder} in '{root}' (looked for {' and '.join(names)} inside it, and at its root)."
        )
    return Sae.load(folder, device, dtype)
