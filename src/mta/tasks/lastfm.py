"""Last.fm artist tagging (LaMP-2 style): which of the 15 most used Last.fm tags does this
user give this artist; accuracy, macro-F1. Data: ``mta data lastfm`` (HetRec 2011)."""

from mta.data.schema import HistoryItem
from mta.tasks.base import Task

# the 15 most used tags of hetrec2011-lastfm-2k's user_taggedartists.dat, most used first
# (``mta.data.lastfm`` checks the files against this list)
LABELS = (
    "rock", "pop", "alternative", "electronic", "indie", "female vocalists", "80s", "dance",
    "alternative rock", "classic rock", "british", "indie rock", "singer-songwriter", "hard rock",
    "experimental",
)
INSTRUCTION = (
    "Which tag does this user give this artist among the following tags? Just answer with the tag "
    "name without further explanation. tags: [{tags}] artist: {artist}"
)


class ArtistTaggingTask(Task):
    def render_item(self, item: HistoryItem) -> str:
        return f'the tag for the artist "{item.get("artist")}" is "{item.get("tag")}"'

    def item_example(self, item: HistoryItem) -> tuple[str, str]:
        return self.query_input(str(item.get("artist"))), str(item.get("tag"))

    def query_input(self, artist: str) -> str:
        return INSTRUCTION.format(tags=", ".join(self.labels), artist=artist)

    def item_label(self, item: HistoryItem) -> str | None:
        return str(item.get("tag"))


TASK = ArtistTaggingTask(
    name="lastfm",
    title="Last.fm artist tagging (15 tags)",
    kind="classification",
    item_fields=("artist", "tag"),
    labels=LABELS,
    content_marker="artist: ",
)
