"""The Hugging Face hub, as the stages meet it: a quick reachability check, and one clear
message when a model or dataset is neither reachable nor in the local cache.

Without network, huggingface_hub and datasets retry with back-off (tens of seconds) before
they give up; a stage checks first (one HEAD request, a few seconds at most) and, when the
hub cannot be reached, reads the local cache only. What is missing is then named at once,
with the three ways to provide it: HF_TOKEN (gated or private repositories), HF_HOME (a cache
that holds it) or a local path in config. HF_TOKEN is read from the environment by
huggingface_hub itself and never passed into anything this project records.
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.error
import urllib.request

from cfs.artifacts import scrub_secrets

log = logging.getLogger("cfs.hub")
PROBE_TIMEOUT_S = 4.0
_TRUE = {"1", "on", "yes", "true"}


class MissingFromHub(SystemExit):
    """A model or dataset that cannot be had: neither on a reachable hub nor in the cache.

    A SystemExit carrying one message, so the stage stops with that message and no
    traceback (the message is what the user needs to act on)."""


def offline_requested() -> bool:
    return any(
        os.environ.get(key, "").strip().lower() in _TRUE
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint (through any configured proxy): any HTTP answer
    means reachable; a refused, unresolvable or silent host means not."""
    if offline_requested():
        return False
    request = urllib.request.Request(endpoint(), method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the hub answered, if only with an error status
    except (urllib.error.URLError, OSError, ValueError):
        return False


def go_offline_unless_reachable() -> bool:
    """Set HF_HUB_OFFLINE (and the datasets/transformers equivalents) when the hub cannot
    be reached, so the libraries read the cache at once instead of retrying. Call it
    before importing datasets or transformers. Returns whether the hub is reachable."""
    if hub_reachable():
        return True
    if not offline_requested():
        log.warning("the hub at %s cannot be reached; using the local cache only", endpoint())
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"
    # the libraries read these at import: tell the ones already imported too
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    return False


def cache_home() -> str:
    return os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )


def missing_message(kind: str, repo_id: str, config_hint: str, reason: str) -> str:
    """What is missing, why, and the three ways to provide it."""
    download = (
        f"hf download {repo_id}"
        if kind == "model"
        else f"hf download --repo-type dataset {repo_id}"
    )
    return (
        f"{kind} '{repo_id}' is not available: {reason}. Provide it in one of these ways: "
        f"(1) with network, set HF_TOKEN in the environment if the repository is gated or "
        f"private (accept its terms on the hub first); (2) set HF_HOME to a Hugging Face "
        f"cache that holds it (now: {cache_home()}): one where this step ran before with "
        f"network, or one filled with `{download}`; (3) {config_hint}."
    )


def explain_hub_error(
    error: BaseException, kind: str, repo_id: str, config_hint: str, reachable: bool
) -> str:
    """A one-paragraph reason for a huggingface_hub / datasets error, by its kind."""
    name = type(error).__name__
    text = str(error)
    if name == "GatedRepoError" or "gated" in text.lower():
        reason = "it is gated: HF_TOKEN must belong to an account that accepted its terms"
    elif name in ("RepositoryNotFoundError", "DatasetNotFoundError") and "offline" not in text:
        reason = (
            "the hub says it does not exist or is private (check the id; private and "
            "gated repositories need HF_TOKEN)"
        )
    elif name == "RevisionNotFoundError":
        reason = "the requested revision does not exist"
    else:
        reason = (
            f"the hub refused it ({name}: {text[:200]})"
            if reachable
            else "it is not in the local cache, and the hub cannot be reached (no network, "
            "or HF_HUB_OFFLINE is set)"
        )
    return scrub_secrets(missing_message(kind, repo_id, config_hint, reason))
