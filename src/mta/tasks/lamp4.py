"""LaMP-4: personalised news headline generation; ROUGE-1, ROUGE-L."""

from mta.data.schema import HistoryItem
from mta.tasks.base import Task


class HeadlineTask(Task):
    def render_item(self, item: HistoryItem) -> str:
        return f'"{item.get("title")}" is the title for "{item.get("text")}"'

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        return f"Generate a headline for the following article: {item.get('text')}", str(
            item.get("title")
        )


TASK = HeadlineTask(
    name="lamp4",
    title="LaMP-4 (news headline generation)",
    kind="generation",
    item_fields=("text", "title"),
    content_marker="article: ",
)
