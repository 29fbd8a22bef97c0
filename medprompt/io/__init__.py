"""Reading volumes and label maps, writing label maps: the only place file formats are handled."""

from medprompt.io.volume import (
    VOLUME_SUFFIXES,
    Volume,
    find_volumes,
    load_labelmap,
    load_volume,
    read_label_names,
    save_labelmap,
    save_volume,
    sidecar_path,
    volume_stem,
    write_json,
)

__all__ = [
    "VOLUME_SUFFIXES",
    "Volume",
    "find_volumes",
    "load_labelmap",
    "load_volume",
    "read_label_names",
    "save_labelmap",
    "save_volume",
    "sidecar_path",
    "volume_stem",
    "write_json",
]
