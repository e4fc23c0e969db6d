"""Pushing to the Hugging Face Hub: the options every pushing command shares, the token, and the upload.

Used by `train.py --push_to_hub`, `python -m recaption.publish` and the converters in `modeling_alip/`, so
that each has the same flags (`--hub_private_repo`, `--hub_revision`, `--hub_commit_message`,
`--hub_create_pr`, `--hub_token`) with the same meaning.

Uploads go through `HfApi.upload_folder`. In huggingface_hub >= 1.0 with `hf_xet` (its default) a large
folder is committed in several batches and an interrupted upload resumes when the same command runs again
(already committed files are skipped, uploaded chunks deduplicated). `HfApi.upload_large_folder`, the other
resumable route, takes no commit message and cannot open a pull request, so it would drop two of the options
above; upload_folder keeps all of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, get_token

logger = logging.getLogger(__name__)

# Never uploaded from a run's directory: resumable checkpoints (optimizer state, large and private to the
# run), atomic writers' temporary files and the run's lock file stay local.
# (fnmatch patterns on paths relative to the folder; `*` also matches `/`.)
RUN_IGNORE_PATTERNS = ["checkpoints/*", ".*tmp*", "*/.*tmp*", "*.tmp", ".train.lock"]
# Arguments never written anywhere (train_args.yaml is uploaded with the model; trackers and checkpoints keep
# what they are given).
SECRET_ARGUMENTS = ("hub_token",)
NO_TOKEN_MESSAGE = ("pushing to the Hub needs a token with write access: pass --hub_token, set the HF_TOKEN "
                    "environment variable, or log in once with `hf auth login`")


@dataclass
class HubArguments:
    """How a command pushes to the Hub. The repository id (`--hub_model_id`, `--hub_dataset_id`) and whether to
    push at all (`--push_to_hub`) are the command's own flags."""

    _argument_group_name = "hub"

    hub_private_repo: bool | None = field(default=None, metadata={
        "help": "Create the repository as private (an existing repository keeps its visibility); default: the "
                "Hub's (public, or your organisation's default)."})
    hub_revision: str | None = field(default=None, metadata={
        "help": "Branch to push to (created from main if missing); default: main."})
    hub_commit_message: str | None = field(default=None, metadata={"help": "Commit message of the upload."})
    hub_create_pr: bool = field(default=False, metadata={
        "help": "Open a pull request against main instead of committing to it."})
    hub_token: str | None = field(default=None, metadata={
        "help": "Hub token; default: HF_TOKEN, else the token saved by `hf auth login`."})

    def __post_init__(self):
        if self.hub_create_pr and self.hub_revision:
            raise ValueError("--hub_create_pr opens a pull request against main; it cannot be combined with "
                             "--hub_revision (push to a branch, or open a pull request)")

    def hub_options(self) -> "HubOptions":
        return HubOptions(private=self.hub_private_repo, revision=self.hub_revision,
                          commit_message=self.hub_commit_message, create_pr=self.hub_create_pr, token=self.hub_token)


@dataclass
class HubOptions:
    """The resolved Hub options of one push (see `HubArguments` for their meaning)."""

    private: bool | None = None
    revision: str | None = None
    commit_message: str | None = None
    create_pr: bool = False
    token: str | None = None


def resolve_token(token: str | None = None) -> str:
    """`token`, else `HF_TOKEN` / the stored login (`huggingface_hub.get_token`).

    Raises:
        ValueError: no token anywhere; the message says the three ways to give one.
    """
    token = token or get_token()
    if not token:
        raise ValueError(NO_TOKEN_MESSAGE)
    return token


def prepare_repo(repo_id: str, options: HubOptions, repo_type: str = "model") -> HfApi:
    """Creates the repository (and the branch `options.revision`) if missing; returns an authenticated `HfApi`.

    Raises:
        ValueError: no token (see `resolve_token`), or `create_pr` together with `revision`.
    """
    if options.create_pr and options.revision:
        raise ValueError("--hub_create_pr cannot be combined with --hub_revision")
    api = HfApi(token=resolve_token(options.token))
    api.create_repo(repo_id, repo_type=repo_type, private=options.private, exist_ok=True)
    if options.revision:
        api.create_branch(repo_id, branch=options.revision, repo_type=repo_type, exist_ok=True)
    return api


def push_folder(folder: str | os.PathLike, repo_id: str, options: HubOptions, repo_type: str = "model",
                ignore_patterns: list[str] | None = None, default_message: str | None = None):
    """Uploads `folder` to `repo_id` (resumable: run the same push again after an interruption).

    Args:
        folder: the local directory; its layout is kept in the repository.
        repo_id: `user/name` or `org/name`.
        options: private / revision / commit message / pull request / token.
        repo_type: `"model"` or `"dataset"`.
        ignore_patterns: globs of files that stay local (default: `RUN_IGNORE_PATTERNS`).
        default_message: the commit message when `options.commit_message` is not set.

    Returns:
        huggingface_hub's `CommitInfo` (its `pr_url` is set with `create_pr`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory to upload")
    api = prepare_repo(repo_id, options, repo_type)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, revision=options.revision,
        commit_message=options.commit_message or default_message or f"Upload {folder.name}",
        create_pr=options.create_pr,
        ignore_patterns=RUN_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns)
    logger.info("pushed %s to %s%s", folder, repo_id, f" ({info.pr_url})" if getattr(info, "pr_url", None) else "")
    return info


# ----------------------------------------------------------------------------------------------------------------
# Commands built on argparse (the converters): the same flags through HfArgumentParser
# ----------------------------------------------------------------------------------------------------------------


def hub_parser(**kwargs):
    """An `HfArgumentParser` holding the `HubArguments` flags and `--hub_model_id`; add the command's own flags
    with `add_argument`, parse with `parse_args`, then `hub_arguments(namespace)`."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(HubArguments, **kwargs)
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output directory to the Hub.")
    parser.add_argument("--hub_model_id", default=None,
                        help="Hub model repository (user/name or org/name) that --push_to_hub uploads the output to.")
    return parser


def hub_arguments(namespace) -> HubArguments:
    """The `HubArguments` of a namespace parsed by `hub_parser` (validated)."""
    arguments = HubArguments(**{name: getattr(namespace, name) for name in HubArguments.__dataclass_fields__})
    if namespace.push_to_hub and not namespace.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    return arguments


def push_model_directory(directory: str | os.PathLike, hub_model_id: str | None, arguments: HubArguments,
                         what: str = "model"):
    """Uploads a converted model directory to `hub_model_id` (when it is set: `--push_to_hub`), the whole
    directory but temporary files; returns the `CommitInfo` or None."""
    if not hub_model_id:
        return None
    return push_folder(directory, hub_model_id, arguments.hub_options(), ignore_patterns=[".*tmp*", "*.tmp"],
                       default_message=f"Upload {what} converted with alip-hf")
