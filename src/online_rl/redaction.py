"""Keep secrets out of what a run writes: the saved configs (ours and Hydra's), the tracker and the printed
resume command. A value is hidden when its key's last word names a secret (`api_key`, `hf_token`,
`password`, ...) or when it looks like a known token. Environment variables are never saved."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

REDACTED = "<redacted>"
# The key's last word: `max_num_batched_tokens` or `tokenizer_vocab_size` are not secrets, `hf_token` is.
SECRET_KEY = re.compile(
    r"(?:^|_)(?:token|secret|password|passwd|passphrase|credentials?|key|apikey|auth)$", re.IGNORECASE
)
SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{30,}"  # Hugging Face access token
    r"|sk-[A-Za-z0-9_-]{20,}"  # OpenAI-style API key
    r"|(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"  # user:password in a URL
)
# `key=value` inside override strings; `key` may be dotted (`rewards.judge.kwargs.api_key`) or prefixed (+, ~).
OVERRIDE = re.compile(r"(?P<key>[+~]*[\w.\-/]+)=(?P<value>[^,]*)")


def is_secret_key(key: Any) -> bool:
    return isinstance(key, str) and bool(SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact_override(text: str) -> str:
    """`a.api_key=xyz` -> `a.api_key=<redacted>`; also for comma-joined lists (Hydra's override_dirname)."""

    def hide(match: re.Match) -> str:
        if is_secret_key(match["key"].lstrip("+~")):
            return f"{match['key']}={REDACTED}"
        return SECRET_VALUE.sub(REDACTED, match[0])

    return SECRET_VALUE.sub(REDACTED, OVERRIDE.sub(hide, text))


def redact(node: Any) -> Any:
    """A copy of a plain container (dicts, lists, scalars) with the secrets replaced."""
    if isinstance(node, dict):
        return {k: REDACTED if is_secret_key(k) and v is not None else redact(v) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(item) for item in node]
    if isinstance(node, str):
        return redact_override(node)
    return node


def redacted_container(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (what trackio gets), without secrets."""
    return redact(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def save_config(cfg: DictConfig, path: Path) -> None:
    OmegaConf.save(OmegaConf.create(redacted_container(cfg)), path)


def redact_hydra_outputs(output_dir: Path) -> None:
    """Hydra writes the composed config and the command-line overrides under .hydra/ before the run starts."""
    try:
        from hydra.core.hydra_config import HydraConfig

        subdir = HydraConfig.get().output_subdir
    except ValueError:  # composed without @hydra.main: Hydra wrote nothing
        return
    if subdir is None:
        return
    for path in (output_dir / subdir).glob("*.yaml"):
        loaded = OmegaConf.load(path)
        plain = OmegaConf.to_container(loaded, resolve=False)
        cleaned = redact(plain)
        if cleaned != plain:
            kind = ListConfig if isinstance(loaded, ListConfig) else DictConfig
            OmegaConf.save(kind(cleaned), path)
