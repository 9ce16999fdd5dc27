"""MovieLens rating (LaMP-3 style): predict a user's 1-5 score for a movie; MAE, RMSE."""

from mta.data.schema import HistoryItem
from mta.tasks.base import Task

INSTRUCTION = (
    'What score from 1 to 5 would this user give the movie "{title}" (genres: {genres})? '
    "Just answer with 1, 2, 3, 4, or 5 without further explanation."
)


class MovieRatingTask(Task):
    def render_item(self, item: HistoryItem) -> str:
        return f'{item.get("score")} is the score for "{item.get("title")}" ({item.get("genres")})'

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        return self.query_input(item.get("title"), item.get("genres")), str(item.get("score"))

    def query_input(self, title: str, genres: str) -> str:
        return INSTRUCTION.format(title=title, genres=genres)

    def retrieval_text(self, query_input: str) -> str:
        return query_input.split("Just answer", 1)[0]

    def item_label(self, item: HistoryItem) -> str | None:
        return str(item.get("score"))


TASK = MovieRatingTask(
    name="movielens",
    title="MovieLens rating (LaMP-3 style)",
    kind="rating",
    item_fields=("title", "genres", "score"),
)
