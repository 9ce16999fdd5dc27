"""LaMP-2 (movies): personalised movie tagging over 15 tags; accuracy, macro-F1."""

from mta.data.schema import HistoryItem
from mta.tasks.base import Task

LABELS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia",
    "dark comedy", "classic", "psychology", "fantasy", "romance", "thought-provoking",
    "social commentary", "violence", "true story",
)
INSTRUCTION = (
    "Which tag does this movie relate to among the following tags? Just answer with the tag "
    "name without further explanation. tags: [{tags}] description: {description}"
)


class TaggingTask(Task):
    """Shared by every tagging task (LaMP-2 and the synthetic one): item = description + tag."""

    def render_item(self, item: HistoryItem) -> str:
        return f'the tag for the movie: "{item.get("description")}" is "{item.get("tag")}"'

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        return self.query_input(str(item.get("description"))), str(item.get("tag"))

    def query_input(self, description: str) -> str:
        return INSTRUCTION.format(tags=", ".join(self.labels), description=description)

    def item_label(self, item: HistoryItem) -> str | None:
        return str(item.get("tag"))


TASK = TaggingTask(
    name="lamp2",
    title="LaMP-2 (movie tagging)",
    kind="classification",
    item_fields=("description", "tag"),
    labels=LABELS,
    content_marker="description: ",
)
