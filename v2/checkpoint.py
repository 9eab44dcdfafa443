"""Loading and saving checkpoints in the Fast-dLLM v2 release layout, with no remote code.

The release's config.json names remote code (`auto_map`, model_type `Fast_dLLM_Qwen`) that breaks
on transformers 5, so we read config.json ourselves, build our own network from its Qwen2 fields
and copy the safetensors in by name. A plain Qwen2 checkpoint loads the same way.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from v2.model import ConfigError, ModelConfig, Network

MASK_TOKEN = "|<MASK>|"
STOP_TOKEN = "<|im_end|>"


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or used; the message says what to do."""


def parse_device(name: str | torch.device | None) -> torch.device:
    """The device named (None: cuda when there is one, else cpu), if this machine has it;
    CheckpointError with one line if not."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"unknown device {name!r}: cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CheckpointError(f"device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "" if torch.version.cuda else " (this torch is built without CUDA)"
            raise CheckpointError(f"device {name!r}: no CUDA GPU here{built}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CheckpointError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    return device


def device_arg(text: str) -> torch.device:
    """An argparse `type` for --device: a device this machine has, or argparse's one-line error."""
    try:
        return parse_device(text)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class TokenIds:
    mask: int
    eos: int  # the stop token
    pad: int


def resolve(path: str | Path) -> Path:
    """A local checkpoint directory, or a hub id fetched where the hub is reachable."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(f"checkpoint {p} has no config.json")
        return p
    if p.exists() or str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path)))
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise CheckpointError(
            f"checkpoint not found: {path} is not a local directory and the hub could not "
            f"provide it ({type(e).__name__}); download it where the hub is reachable and pass "
            "the directory"
        ) from None


def read_config(path: str | Path) -> ModelConfig:
    directory = resolve(path)
    try:
        return ModelConfig.from_dict(json.loads((directory / "config.json").read_text()))
    except ConfigError as e:
        raise CheckpointError(f"{directory}: {e}") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {directory} has no .safetensors weights")
    return files


def _checkpoint_to_ours(name: str) -> tuple[str, int | None]:
    """Map a Qwen2 tensor name to (our parameter name, slot in a fused tensor or None)."""
    name = name.removeprefix("model.")
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        if f"self_attn.{part}." in name:
            return name.replace(part, "qkv_proj"), i
    for i, part in enumerate(("gate_proj", "up_proj")):
        if f"mlp.{part}." in name:
            return name.replace(part, "gate_up_proj"), i
    return name, None


def load_model(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> Network:
    """bf16 on GPU and float32 on CPU unless `dtype` says otherwise."""
    directory = resolve(path)
    cfg = read_config(directory)
    device = parse_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        model = Network(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    parts: dict[str, list[torch.Tensor | None]] = {}
    seen = set()
    for file in _weight_files(directory):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                ours, slot = _checkpoint_to_ours(key)
                if ours not in params:
                    raise CheckpointError(f"{file.name}: unexpected tensor {key}")
                tensor = f.get_tensor(key)
                if slot is None:
                    params[ours].data.copy_(tensor)
                    seen.add(ours)
                else:
                    n = 3 if "qkv_proj" in ours else 2
                    parts.setdefault(ours, [None] * n)[slot] = tensor
    for ours, pieces in parts.items():
        if any(p is None for p in pieces):
            raise CheckpointError(f"{directory}: incomplete tensors for {ours}")
        params[ours].data.copy_(torch.cat(pieces, dim=0))
        seen.add(ours)
    missing = [
        n
        for n in params
        if n not in seen and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    ]
    if missing:
        raise CheckpointError(f"{directory}: missing tensors {', '.join(missing[:4])}")
    return model.eval()


def release_state_dict(model: Network) -> dict[str, torch.Tensor]:
    """Our parameters under the checkpoint's Qwen2 names, fused tensors split again."""
    cfg, out = model.cfg, {}
    hd = cfg.head_dim
    split = {
        "qkv_proj": (
            ("q_proj", "k_proj", "v_proj"),
            [
                cfg.num_attention_heads * hd,
                cfg.num_key_value_heads * hd,
                cfg.num_key_value_heads * hd,
            ],
        ),
        "gate_up_proj": (("gate_proj", "up_proj"), [cfg.intermediate_size] * 2),
    }
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        prefix = "" if name == "lm_head.weight" else "model."
        fused = next((f for f in split if f".{f}." in name), None)
        if fused is None:
            out[prefix + name] = tensor
            continue
        names, sizes = split[fused]
        for part, piece in zip(names, tensor.split(sizes, dim=0), strict=True):
            out[prefix + name.replace(fused, part)] = piece
    return out


def save_release_checkpoint(
    model: Network,
    out_dir: str | Path,
    tokenizer=None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json, safetensors (sharded with an index when `max_shard_bytes` is given) and
    the tokenizer, laid out like the release."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.cfg.to_release_dict(), indent=2) + "\n")
    tensors = {
        k: v.detach().to("cpu", dtype).contiguous() for k, v in release_state_dict(model).items()
    }
    if max_shard_bytes is None:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in tensors.items():
            if shards[-1] and size + v.numel() * v.element_size() > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += v.numel() * v.element_size()
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        index = {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
            "weight_map": weight_map,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_tokenizer(path: str | Path, mask_token: str | None = None):
    """The checkpoint's tokenizer and its mask / stop / pad ids. Never runs remote code."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    directory = resolve(path)
    # The release's model_type is unknown to transformers, which warns about it on every load
    # although only the tokenizer is read here.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    finally:
        logging.set_verbosity(verbosity)
    return tokenizer, token_ids(tokenizer, mask_token)


def token_ids(tokenizer, mask_token: str | None = None) -> TokenIds:
    vocab = tokenizer.get_vocab()
    mask_name = mask_token or MASK_TOKEN
    if mask_name not in vocab:
        raise CheckpointError(
            f"the tokenizer has no mask token {mask_name!r}; pass mask_token=<a token of its "
            "vocabulary> (--mask-token on the command line) to choose one"
        )
    eos = vocab.get(STOP_TOKEN, tokenizer.eos_token_id)
    if eos is None:
        raise CheckpointError(f"the tokenizer has neither {STOP_TOKEN!r} nor an eos_token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return TokenIds(mask=vocab[mask_name], eos=eos, pad=pad)
