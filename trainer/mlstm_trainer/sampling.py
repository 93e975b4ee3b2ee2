"""Generate text from a trained model, one byte at a time, carrying the recurrent state."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CONFIG, MODEL, load_checkpoint
from .config import config_from_dict
from .corpus import DOC_SEPARATOR
from .model import MLSTM


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> MLSTM:
    """Rebuild the model a checkpoint was trained with and load its weights."""
    return model_from_state(load_checkpoint(checkpoint, map_location=device), device)


def model_from_state(state: dict, device: str | torch.device = "cpu") -> MLSTM:
    """The model of an already loaded checkpoint state, in eval mode."""
    shape = config_from_dict(state[CONFIG]).model
    model = MLSTM(vocab_size=shape.vocab_size, embed_dim=shape.embed_dim, hidden_size=shape.hidden_size)
    model.load_state_dict(state[MODEL])
    return model.to(device).eval()


@torch.no_grad()
def sample_bytes(model: MLSTM, *, prompt: bytes = b"", length: int = 300, temperature: float = 1.0, seed: int = 0) -> bytes:
    """Continue `prompt` by `length` bytes; temperature 0 picks the most likely byte each time."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    # A document starts right after a separator, so the separator primes a fresh document.
    context = torch.tensor([[DOC_SEPARATOR, *prompt]], dtype=torch.long, device=device)
    logits, state = model(context)
    produced = bytearray()
    for _ in range(length):
        last = logits[0, -1].float()
        if temperature == 0:
            token = int(last.argmax())
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        produced.append(token)
        logits, state = model(torch.tensor([[token]], device=device), state)
    return bytes(produced)


def sample_text(model: MLSTM, *, prompt: str = "", length: int = 300, temperature: float = 1.0, seed: int = 0) -> str:
    """`sample_bytes` decoded as UTF-8 (invalid sequences shown as U+FFFD)."""
    data = sample_bytes(model, prompt=prompt.encode("utf-8"), length=length, temperature=temperature, seed=seed)
    return data.decode("utf-8", errors="replace")
