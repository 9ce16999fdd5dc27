"""The synthetic tagging task made by ``mta data synth``: LaMP-2's format over 6 tags."""

from mta.tasks.lamp2 import TaggingTask

LABELS = ("action", "comedy", "romance", "horror", "sci-fi", "drama")

TASK = TaggingTask(
    name="synth",
    title="synthetic movie tagging (6 tags, latent taste groups)",
    kind="classification",
    item_fields=("description", "tag"),
    labels=LABELS,
    content_marker="description: ",
)
