"""Last.fm artist tagging (LaMP-2 style): which of the 15 most used Last.fm tags does this
user give this artist; accuracy, macro-F1. Data: ``mta data lastfm`` (HetRec 2011)."""

from mta.tasks.lamp2 import TaggingTask

# the 15 most used tags of hetrec2011-lastfm-2k's user_taggedartists.dat, most used first
LABELS = (
    "rock", "pop", "alternative", "electronic", "indie", "female vocalists", "80s", "dance",
    "alternative rock", "classic rock", "british", "indie rock", "singer-songwriter", "hard rock",
    "experimental",
)
INSTRUCTION = (
    "Which tag does this user give this artist among the following tags? Just answer with the tag "
    "name without further explanation. tags: [{tags}] artist: {content}"
)

TASK = TaggingTask(
    name="lastfm",
    title="Last.fm artist tagging (15 tags)",
    kind="classification",
    item_fields=("artist", "tag"),
    labels=LABELS,
    content_marker="artist: ",
    instruction=INSTRUCTION,
    content_field="artist",
    subject="artist",
)
