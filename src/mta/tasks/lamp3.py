"""LaMP-3: personalised product rating, 1-5 from review text; MAE, RMSE."""

from mta.data.schema import HistoryItem
from mta.tasks.base import Task

INSTRUCTION = (
    "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
    "3, 4, or 5 without further explanation. review: {text}"
)


class ReviewRatingTask(Task):
    def render_item(self, item: HistoryItem) -> str:
        return f'{item.get("score")} is the score for "{item.get("text")}"'

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        return INSTRUCTION.format(text=item.get("text")), str(item.get("score"))

    def item_label(self, item: HistoryItem) -> str | None:
        return str(item.get("score"))


TASK = ReviewRatingTask(
    name="lamp3",
    title="LaMP-3 (product rating)",
    kind="rating",
    item_fields=("text", "score"),
    content_marker="review: ",
)
