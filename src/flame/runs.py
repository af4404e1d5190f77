"""What a run directory holds besides checkpoints, made to work from any folder.

A run's saved config names its inputs, stores and tokenizer by the paths the user typed. Relative
paths only resolve in the folder the run started in, so `flame generate/export/inspect` from
elsewhere used to fall back to another tokenizer. Paths are therefore made absolute when a run
starts, and the run keeps a copy of its tokenizer in `<run_dir>/tokenizer/`.
"""

from __future__ import annotations

import copy
import glob
import os
from pathlib import Path

from flame.errors import CheckpointError, FlameError

TOKENIZER_DIR = "tokenizer"
_PATH_KEYS = (
    ("model", "init_from"),
    ("data", "store"),
    ("data", "cache_dir"),
    ("data", "tokenizer"),
    ("eval", "store"),
    ("checkpoint", "load"),
)
_ALWAYS = {("data", "cache_dir"), ("checkpoint", "load")}  # paths, never names: absolute even if absent


def _abs(value: str, base: Path, always: bool = False) -> str:
    """`value` as an absolute path when it names something that exists relative to `base` (or a glob
    that matches there); `always` for folders made later (a cache directory)."""
    if not value or value.startswith("hf:"):
        return value
    value = os.path.expanduser(value) if value.startswith("~") else value
    if os.path.isabs(value):
        return value
    p = base / value
    if always or p.exists() or (any(c in value for c in "*?[") and glob.glob(str(p), recursive=True)):
        return os.path.normpath(str(base.resolve() / value))
    return value


def _abs_model_name(name: str, base: Path) -> str:
    """A config.json path, or the file of `path/to/file.py:function`; presets and modules unchanged."""
    if name.count(":") and name.rpartition(":")[0].endswith(".py"):
        file, _, fn = name.rpartition(":")
        return f"{_abs(file, base)}:{fn}"
    return _abs(name, base)


def _abs_mix(spec: str, base: Path) -> str:
    """A mixture spec with absolute store paths; each source keeps the name it had (`name=` prefix)."""
    from flame.data.mixture import parse_named_mix

    try:
        entries = parse_named_mix(spec)
    except ValueError:
        return spec  # validation reports it
    raw = [e.strip() for e in spec.split(",")]
    out = []
    for (name, path, _), text in zip(entries, raw):
        weight = text.rpartition(":")[2].strip()
        plain = not any(c in name for c in "/\\:")  # only such names can be written as a `name=` prefix
        out.append(f"{name + '=' if plain else ''}{_abs(path, base)}:{weight}")
    new = ",".join(out)
    # a name derived from folders keeps its value when only the path's head changes; if it would not,
    # keep the spec as typed rather than rename a source
    return new if [e[0] for e in parse_named_mix(new)] == [e[0] for e in entries] else spec


def absolute_paths(d: dict, base: str | Path | None = None) -> dict:
    """A copy of a config dict (Config.to_dict() form) whose file paths are absolute, resolved against
    `base` (the working directory). Names that are not existing paths (presets, `byte`, hub names,
    `stdlib`, `hf:` specs, modules) are left as they are."""
    base = Path(base or os.getcwd())
    d = copy.deepcopy(d)
    for section, key in _PATH_KEYS:
        if isinstance(d.get(section, {}).get(key), str):
            d[section][key] = _abs(d[section][key], base, always=(section, key) in _ALWAYS)
    model = d.get("model", {})
    if isinstance(model.get("name"), str):
        model["name"] = _abs_model_name(model["name"], base)
    for section in ("data", "eval"):
        body = d.get(section, {})
        if isinstance(body.get("inputs"), list):
            body["inputs"] = [_abs(x, base) if isinstance(x, str) else x for x in body["inputs"]]
    data = d.get("data", {})
    if isinstance(data.get("mix"), str) and data["mix"]:
        data["mix"] = _abs_mix(data["mix"], base)
    for ph in data.get("phases") or []:
        if isinstance(ph, dict) and isinstance(ph.get("mix"), str):
            ph["mix"] = _abs_mix(ph["mix"], base)
    return d


def with_absolute_paths(cfg):
    """A copy of a Config with `absolute_paths` applied (no re-validation: the values name the same files)."""
    new = absolute_paths(cfg.to_dict())
    out = copy.deepcopy(cfg)
    for section, body in new.items():
        sec = getattr(out, section)
        for key, value in body.items():
            if getattr(sec, key) != value:
                setattr(sec, key, value)
    return out


def save_run_tokenizer(tok, run_dir: Path) -> None:
    """Keep a copy of the run's tokenizer in the run directory (once; the same one on resume). A
    resume allowed to change it keeps the earlier copy as `tokenizer-<fingerprint>`: earlier
    checkpoints decode with theirs."""
    from flame.data.tokenizer import save_tokenizer_copy

    run_dir = Path(run_dir)
    save_tokenizer_copy(
        tok, run_dir / TOKENIZER_DIR, keep_old_as=lambda old: run_dir / f"{TOKENIZER_DIR}-{old[:12]}"
    )


def write_run_files(run_dir: Path, cfg, tok, loader) -> None:
    """What generate, export and inspect read from a run directory besides checkpoints: the full
    config.toml, a copy of the tokenizer, and the loader's data plan (what inspect reconstructs
    earlier steps from)."""
    (Path(run_dir) / "config.toml").write_text(cfg.to_toml())
    save_run_tokenizer(tok, run_dir)
    if hasattr(loader, "save_plan"):
        loader.save_plan(run_dir)


def run_tokenizer(run_dir: str | Path, cfg, state: dict | None = None):
    """The tokenizer a run trained with: its copy in the run directory, else its config's data.tokenizer
    (runs made before the copy existed). When the checkpoint's run state records the tokenizer's
    fingerprint, any other tokenizer is refused: same-sized vocabularies would otherwise load."""
    from flame.data.build import resolve_tokenizer
    from flame.data.tokenizer import load_tokenizer

    want = ((state or {}).get("tokenizer") or {}).get("fingerprint")
    copy_dir = Path(run_dir) / TOKENIZER_DIR
    if want and (Path(run_dir) / f"{TOKENIZER_DIR}-{want[:12]}").is_dir():  # replaced by a later resume
        copy_dir = Path(run_dir) / f"{TOKENIZER_DIR}-{want[:12]}"
    if copy_dir.is_dir():
        try:
            tok = load_tokenizer(str(copy_dir))
        except Exception as e:
            raise FlameError(
                f"the run's tokenizer copy {copy_dir} is unreadable: {e}",
                hint="restore it from a backup of the run, or delete it to use the config's data.tokenizer",
            ) from None
    else:
        try:
            tok = resolve_tokenizer(cfg)
        except FlameError as first:  # a run before the copy existed: its stores under <run_dir>/data keep one
            stores = sorted(Path(run_dir).glob("data/*/tokenizer"))
            if not stores:
                raise FlameError(
                    f"cannot load the run's tokenizer: {first.message}",
                    hint="run the command where the run started (this run predates absolute paths), or pass "
                    "the tokenizer",
                ) from None
            tok = load_tokenizer(str(stores[0]))
    if want and tok.fingerprint != want:
        raise FlameError(
            f"the tokenizer {tok.spec!r} (fingerprint {tok.fingerprint[:12]}) is not the one the checkpoint "
            f"was trained with (fingerprint {want[:12]})",
            hint=f"restore the run's {copy_dir} or the file its data.tokenizer names",
        )
    return tok


def check_same_tokenizer(saved: dict, tok, allow_change: bool) -> None:
    """Refuse a resume whose tokenizer is not the checkpoint's (the same path may hold another file)."""
    want = (saved.get("tokenizer") or {}).get("fingerprint")
    if want and tok.fingerprint != want and not allow_change:
        raise CheckpointError(
            f"resuming would change the tokenizer: {tok.spec!r} has fingerprint {tok.fingerprint[:12]}, the "
            f"checkpoint's has {want[:12]}",
            hint="resume with the tokenizer the run trained with (a copy is in the run's tokenizer/ folder), "
            "or pass --checkpoint.allow_config_change true",
        )
