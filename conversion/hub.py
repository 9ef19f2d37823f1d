"""Uploading a converted folder to the Hugging Face Hub, through huggingface_hub only."""

from pathlib import Path

from huggingface_hub import HfApi

from .errors import ConversionError


def push_folder(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """Create `repo_id` (if needed), the branch `revision` (if given), and upload `folder`; returns the commit URL."""
    api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id=repo_id, repo_type="model", branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            revision=revision,
            commit_message=f"Upload {folder.name} converted by hf-vit-convert",
        )
    except Exception as error:  # network, auth and permission errors all end the same way for the user
        message = " ".join(str(error).split())[:300]
        raise ConversionError(
            f"Upload to {repo_id} failed ({type(error).__name__}: {message}); the converted folder is kept at "
            f"{folder}: log in with `hf auth login` and upload it again."
        ) from None
    return str(getattr(commit, "commit_url", commit))


__all__ = ["push_folder"]
