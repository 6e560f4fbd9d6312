"""Edge -> server token compression: selectors, k-means, the wire codec, the TCP link, eval/sweep.

Importing the package registers the built-in selectors.
"""

from dmclip.compress import codec, kmeans, selectors  # noqa: F401
from dmclip.compress.codec import Payload, decode, encode, payload_stats  # noqa: F401
from dmclip.compress.selectors import Selector, build_selector, restore_payload  # noqa: F401
