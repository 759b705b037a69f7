"""Publish an output folder to the Hugging Face Hub with ``huggingface_hub``.

``push`` creates the repo when needed (``HfApi.create_repo(exist_ok=True)``), creates the branch for a
``revision`` other than ``main``, and uploads the folder with ``HfApi.upload_folder``: the Hub decides per
file (its ``preupload`` answer) what is a regular file, sent inline in the commit, and what is a large file,
sent through its large-file path (Xet when ``hf_xet`` is installed, else LFS). Nothing else is reimplemented.

The token comes from where huggingface_hub looks (``HF_TOKEN``, then the stored login of ``hf auth login``)
or the ``token`` argument. It is never printed or logged, and it is removed from every error message that
passes through here. A dry run plans the upload from the folder alone: files, sizes and the parsed card,
with no network and no token needed.

Example:
    >>> import adaptermerge
    >>> adaptermerge.push("merged", "me/my-merge", dry_run=True).files  # doctest: +SKIP
    [('README.md', 1234), ('adaptermerge_recipe.yaml', 456), ('config.json', 789), ('model.safetensors', 16777216)]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptermerge.errors import PublishError, UsageError, ValidationFailed
from adaptermerge.outputs import CARD_NAME


@dataclass
class PushResult:
    """What was (or, for a dry run, would be) uploaded.

    Attributes:
        repo_id: the target repository.
        files: ``(path in repo, size in bytes)`` of every file, in upload order.
        card: the card's Hub metadata as ``huggingface_hub.ModelCard`` parses it (None without a card).
        card_text: the whole README.md (None without a card).
        dry_run: True when nothing was sent.
        token_source: where the token came from (``argument``, ``HF_TOKEN``, ``stored login``) or None;
            never the token itself.
        url, commit_url, commit_oid: the repo and the commit (None for a dry run).
        warnings: things to know before or after the upload (no card, ...).
    """

    repo_id: str
    files: list[tuple[str, int]]
    card: dict[str, Any] | None
    dry_run: bool
    card_text: str | None = None
    revision: str | None = None
    private: bool = False
    token_source: str | None = None
    url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(s for _, s in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "dry_run": self.dry_run,
            "revision": self.revision,
            "private": self.private,
            "token_source": self.token_source,
            "files": [{"path": p, "size": s} for p, s in self.files],
            "total_bytes": self.total_bytes,
            "card": self.card,
            "card_text": self.card_text,
            "url": self.url,
            "commit_url": self.commit_url,
            "commit_oid": self.commit_oid,
            "warnings": self.warnings,
        }


def upload_files(folder: Path) -> list[tuple[str, int]]:
    """The files ``HfApi.upload_folder`` sends from ``folder``: every file below it, sorted, minus the patterns
    huggingface_hub always ignores (``.git``, ``.cache/huggingface``)."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    rel = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(rel, ignore_patterns=list(DEFAULT_IGNORE_PATTERNS))
    return [(r, rel[r].stat().st_size) for r in kept]


def read_card(folder: Path) -> dict[str, Any] | None:
    """The card's metadata as the Hub parses it, or None without a card.

    Raises:
        PublishError: a card whose metadata the Hub would reject (not YAML, not a mapping).
    """
    if not (folder / CARD_NAME).is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(folder / CARD_NAME).data.to_dict()
    except Exception as e:  # noqa: BLE001 - ModelCard raises ValueError or yaml errors on bad front matter
        raise PublishError(f"{folder / CARD_NAME}: its metadata does not parse ({' '.join(str(e).split())})") from None


def token_source(token: str | None) -> tuple[str | None, str | None]:
    """``(token, where it came from)``: the argument, ``HF_TOKEN``, or the stored login. Reads no network."""
    if token:
        return token, "argument"
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env and env.strip():
        return env.strip(), "HF_TOKEN"
    from huggingface_hub import get_token

    stored = get_token()
    return (stored, "stored login") if stored else (None, None)


def push(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    dry_run: bool = False,
    require_valid: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    validate_options: dict[str, Any] | None = None,
) -> PushResult:
    """Upload an output folder to the Hub (creating the repo and branch when needed).

    Args:
        path: the folder (adapter or checkpoint, with its README.md card).
        repo_id: ``user/name`` or ``org/name``.
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to (created from main when missing); default ``main``.
        message: commit message.
        dry_run: plan only: files, sizes and card; no network, no token needed.
        require_valid: refuse to push when :func:`adaptermerge.validate` finds a failing check.
        token: a Hub token; default: ``HF_TOKEN``, then the stored login.
        endpoint: the Hub's URL (default: ``HF_ENDPOINT`` or huggingface.co).
        validate_options: keyword arguments for :func:`adaptermerge.validate` with ``require_valid``.

    Raises:
        UsageError: not a folder, an invalid repo id.
        ValidationFailed: ``require_valid`` and a check failed.
        PublishError: no token, offline, unreachable Hub, refused token or upload.
    """
    folder, result = _plan(Path(path), repo_id, private, revision)
    if require_valid:
        _require_valid(folder, validate_options or {})
    tok, result.token_source = token_source(token) if not dry_run else _peek_source(token)
    if dry_run:
        return result
    if tok is None:
        raise PublishError("no Hugging Face token: set HF_TOKEN or log in once with `hf auth login`")
    try:
        _upload(folder, result, tok, endpoint, message)
    except PublishError as e:
        raise PublishError(_scrub(str(e), tok)) from None
    except Exception as e:  # noqa: BLE001 - every huggingface_hub/httpx failure becomes one line without the token
        raise PublishError(_scrub(_describe(e, endpoint), tok)) from None
    return result


def _plan(folder: Path, repo_id: str, private: bool, revision: str | None) -> tuple[Path, PushResult]:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; push uploads an output folder")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"{repo_id!r} is not a Hub repo id (user/name): {' '.join(str(e).split())}") from None
    files = upload_files(folder)
    if not files:
        raise UsageError(f"{folder} holds no files to upload")
    card = read_card(folder)
    text = (folder / CARD_NAME).read_text(encoding="utf-8") if card is not None else None
    result = PushResult(repo_id, files, card, dry_run=True, card_text=text, revision=revision, private=private)
    if card is None:
        result.warnings.append(f"{folder} has no {CARD_NAME}: the repo will have no model card")
    elif not card.get("library_name"):
        result.warnings.append(f"{CARD_NAME} names no library_name: the Hub will not know how to load it")
    return folder, result


def _require_valid(folder: Path, options: dict[str, Any]) -> None:
    from adaptermerge.validation import validate

    report = validate(folder, **options)
    if not report.ok:
        first = report.failed[0]
        raise ValidationFailed(
            f"not pushed: validate found {len(report.failed)} failing checks, first {first.name}: {first.message}"
        )


def _peek_source(token: str | None) -> tuple[None, str | None]:
    """Where a token would come from, without reading it (dry runs need none)."""
    from huggingface_hub import constants

    if token:
        return None, "argument"
    if (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip():
        return None, "HF_TOKEN"
    return None, "stored login" if Path(constants.HF_TOKEN_PATH).is_file() else None


def _upload(folder: Path, result: PushResult, token: str, endpoint: str | None, message: str | None) -> None:
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set: huggingface_hub makes no network calls; unset it to push")
    api = HfApi(endpoint=hub_endpoint(endpoint), token=token)
    repo = api.create_repo(result.repo_id, private=result.private, exist_ok=True, repo_type="model")
    if result.revision and result.revision != constants.DEFAULT_REVISION:
        api.create_branch(result.repo_id, branch=result.revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=result.repo_id,
        folder_path=str(folder),
        revision=result.revision,
        commit_message=message or f"Upload {folder.name} with adaptermerge",
    )
    result.dry_run = False
    result.url = str(repo)
    result.commit_url = info.commit_url
    result.commit_oid = info.oid


def hub_endpoint(endpoint: str | None) -> str:
    """The Hub's URL: the argument, else ``HF_ENDPOINT`` as it is now (huggingface_hub reads it once, at import),
    else huggingface.co."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _describe(e: Exception, endpoint: str | None) -> str:
    """One line for a failed upload: what went wrong and what to do."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    where = hub_endpoint(endpoint)
    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: huggingface_hub makes no network calls; unset it to push"
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        code = e.response.status_code
        if code == 401:
            return (
                f"the Hub at {where} refused the token (401 Unauthorized): set a valid HF_TOKEN or run `hf auth login`"
            )
        if code == 403:
            return "the token may not write there (403 Forbidden): use a token with write access to that namespace"
        detail = (getattr(e, "server_message", None) or "").strip() or str(e).splitlines()[0]
        return f"the Hub at {where} answered {code}: {' '.join(detail.split())}"
    if _is_network_error(e):
        return f"cannot reach the Hub at {where} ({type(e).__name__}: {' '.join(str(e).split())}); check the network, HF_ENDPOINT or the proxy"
    return f"upload failed ({type(e).__name__}): {' '.join(str(e).split())}"


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport-level exception types of the HTTP clients huggingface_hub versions use (httpx2, httpx, requests)."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):  # fmt: skip
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def _is_network_error(e: BaseException | None) -> bool:
    kinds = _network_errors()
    while e is not None:
        if isinstance(e, kinds):
            return True
        e = e.__cause__ or e.__context__
    return False


def _scrub(text: str, token: str | None) -> str:
    """``text`` with the token replaced (it must never reach a terminal or a log)."""
    return text.replace(token, "***") if token else text
