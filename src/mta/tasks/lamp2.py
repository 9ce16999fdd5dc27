"""LaMP-2 (movies): personalised movie tagging over 15 tags; accuracy, macro-F1."""

from dataclasses import dataclass

from mta.data.schema import HistoryItem
from mta.tasks.base import Task

LABELS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia",
    "dark comedy", "classic", "psychology", "fantasy", "romance", "thought-provoking",
    "social commentary", "violence", "true story",
)
INSTRUCTION = (
    "Which tag does this movie relate to among the following tags? Just answer with the tag "
    "name without further explanation. tags: [{tags}] description: {content}"
)


@dataclass(frozen=True)
class TaggingTask(Task):
    """Every tagging task (LaMP-2, the synthetic one, Last.fm): an item is a text (its
    ``content_field``) and a tag; the query asks ``instruction`` about one text."""

    instruction: str = INSTRUCTION
    content_field: str = "description"
    subject: str = "movie"  # what an item is, in the prompt's examples

    def render_item(self, item: HistoryItem) -> str:
        return f'the tag for the {self.subject}: "{item.get(self.content_field)}" is "{item.get("tag")}"'

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        return self.query_input(str(item.get(self.content_field))), str(item.get("tag"))

    def query_input(self, content: str) -> str:
        return self.instruction.format(tags=", ".join(self.labels), content=content)

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
