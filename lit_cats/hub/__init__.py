"""Push a run folder (adapter, tokenizer, config, model card) to the Hugging Face Hub.

Lightning-free helpers shared by :class:`lit_cats.callbacks.HubPushCallback` and the
``lit-cats push`` command, by responsibility:

- :mod:`lit_cats.hub.plans`: upload plans, which local file goes to which path in the repo.
- :mod:`lit_cats.hub.card`: the model card and the run facts it reports.
- :mod:`lit_cats.hub.pusher`: commits to the Hub, retries, background pushes, ``push_run``.
"""

from lit_cats.hub.card import (
    RunSummary,
    read_tensorboard_scalars,
    render_model_card,
    summarize_run,
    write_card,
)
from lit_cats.hub.plans import (
    CARD_FILENAME,
    CHECKPOINT_FILENAME,
    CHECKPOINT_FOLDER,
    CONFIG_FILENAME,
    UploadPlan,
    checkpoint_plan,
    folder_plan,
    rerun_config,
    rerun_configs,
    run_plan,
    write_plan,
)
from lit_cats.hub.pusher import (
    HubPusher,
    call_with_retries,
    describe_failure,
    is_retryable,
    push_command,
    push_run,
    run_name,
)

__all__ = [
    "CARD_FILENAME",
    "CHECKPOINT_FILENAME",
    "CHECKPOINT_FOLDER",
    "CONFIG_FILENAME",
    "HubPusher",
    "RunSummary",
    "UploadPlan",
    "call_with_retries",
    "checkpoint_plan",
    "describe_failure",
    "folder_plan",
    "is_retryable",
    "push_command",
    "push_run",
    "read_tensorboard_scalars",
    "render_model_card",
    "rerun_config",
    "rerun_configs",
    "run_name",
    "run_plan",
    "summarize_run",
    "write_card",
    "write_plan",
]
