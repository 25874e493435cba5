"""Reading data (local files, shards, saved datasets, Hub datasets) into rows, and checking them before
anything heavy runs.

Local files are parsed by one streaming reader per format (`readers`), and the same reader serves both
the pre-flight `check_source` and the reading of rows. So what `peftrun validate` accepts is exactly
what training reads, row numbers in errors are exact, and no second cache (like `datasets`' own, keyed
by file mtime) can serve stale rows. Modules:

- readers: one streaming reader per file format.
- paths: what a data path names (`locate`): a file, shards, a glob, a saved dataset, an image folder,
  a Hub id.
- hub: what `datasets` loads itself: Hub ids (with subset, split, data_files) and saved datasets.
- fields: a row's values under peftrun's column names, checked per format.
- checks: every row of a dataset checked, errors naming the file and the row.
- read: `read_rows` for the tasks that read one small dataset.
"""

from peftrun.data.sources.checks import (
    RowRules,
    check_dataset,
    check_file,
    check_source,
    checked_rows,
    local_rows,
)
from peftrun.data.sources.fields import (
    FIELDS,
    KNOWN_ROLES,
    ROW_JSON,
    RowProblem,
    column_map,
    extract_fields,
    image_path,
)
from peftrun.data.sources.hub import hub_load_args, hub_offline, load_hub, load_saved
from peftrun.data.sources.paths import Located, digest_file, is_hub_id, locate, sha256_of
from peftrun.data.sources.read import read_rows
from peftrun.data.sources.readers import IMAGE_SUFFIXES, SUPPORTED_SUFFIXES

__all__ = [
    "FIELDS",
    "IMAGE_SUFFIXES",
    "KNOWN_ROLES",
    "ROW_JSON",
    "SUPPORTED_SUFFIXES",
    "Located",
    "RowProblem",
    "RowRules",
    "check_dataset",
    "check_file",
    "check_source",
    "checked_rows",
    "column_map",
    "digest_file",
    "extract_fields",
    "hub_load_args",
    "hub_offline",
    "image_path",
    "is_hub_id",
    "load_hub",
    "load_saved",
    "local_rows",
    "locate",
    "read_rows",
    "sha256_of",
]
