"""Which lister lists a prefix, by its filesystem: S3 (pipeline/planning/listing.py), GCS (listing_gcs.py) and
Azure (listing_azure.py) page by page with many requests in flight; anything else (local, NFS)
with `fs.find`. Its own module: the GCS and Azure listers use listing.py's helpers, so listing.py
may not import them."""
from __future__ import annotations

from pipeline.planning import listing

from .listing import Columns
from .listing_azure import AzureLister
from .listing_gcs import GCSLister


def list_prefix(fs, path: str, skipped: dict[str, int] | None = None) -> Columns:
    """(image_ids, uris, etags, sizes) of the image keys below `path` (ids relative to it);
    `skipped` counts the other keys by extension."""
    protocols = getattr(fs, "protocol", ())
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    if "gs" in protocols:  # gcsfs
        return GCSLister(fs).list(path, skipped)
    if "abfs" in protocols:  # adlfs
        return AzureLister(fs).list(path, skipped)
    return listing.list_prefix(fs, path, skipped)
