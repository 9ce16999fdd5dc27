"""LaMP-7: personalised tweet paraphrasing; ROUGE-1, ROUGE-L."""

from mta.data.schema import HistoryItem
from mta.tasks.base import Task


class TweetTask(Task):
    def render_item(self, item: HistoryItem) -> str:
        return f'"{item.get("text")}"'

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        # A profile tweet has no source to paraphrase; it trains the user's style.
        return "Write a tweet in your own style.", str(item.get("text"))


TASK = TweetTask(
    name="lamp7",
    title="LaMP-7 (tweet paraphrasing)",
    kind="generation",
    item_fields=("text",),
    content_marker="before or after it: ",
)
