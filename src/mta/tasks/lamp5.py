"""LaMP-5: personalised scholarly title generation; ROUGE-1, ROUGE-L."""

from mta.data.schema import HistoryItem
from mta.tasks.base import Task


class PaperTitleTask(Task):
    def render_item(self, item: HistoryItem) -> str:
        return f'"{item.get("title")}" is the title for "{item.get("abstract")}"'

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        return (f"Generate a title for the following abstract of a paper: {item.get('abstract')}",
                str(item.get("title")))


TASK = PaperTitleTask(
    name="lamp5",
    title="LaMP-5 (scholarly title generation)",
    kind="generation",
    item_fields=("title", "abstract"),
    content_marker="paper: ",
)
