"""Edge -> server token compression: selectors, k-means, the wire codec, the TCP link, eval/sweep.

Importing the package registers the built-in selectors. One concern per module:

    config     CompressConfig and its sections (decode, sweep, finetune); the selector it names
    selectors  what the edge sends instead of all tokens (registry ``selectors``)
    kmeans     batched k-means with restarts, for the kmeans selector
    codec      the binary wire format of a payload, and what a server accepts
    model      the model at both ends: load, check, caption restored tokens
    measure    one selector on a test split: through the codec, captioned, scored, bytes and times
    summary    report.md, summary.md/.csv, the seed paper's claims, the quality-vs-bytes plot
    finetune   the server decoder trained on compressed tokens
    pipeline   run_eval and run_sweep: all of it in order, into the run directory
    link       the TCP frames both ends share
    server     CaptionServer: connections, limits, error replies, statistics
    batching   the server's model thread: requests that arrive together captioned in one call
    client     LinkClient, the edge's end of the link
    endpoints  the model at each end of the link: the server's CaptionHandler, the edge's send_images
    load       the load generator of `compress load`
"""

from dmclip.compress import codec, kmeans, selectors  # noqa: F401
from dmclip.compress.codec import Payload, decode, encode, payload_stats  # noqa: F401
from dmclip.compress.selectors import Selector, build_selector, restore_payload  # noqa: F401
