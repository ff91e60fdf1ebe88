"""Instruction data as practitioners bring it: validated entries and the chapter's split.

Not in the book: the book's `download_and_load_file` trusts the file. Here a malformed entry
is an error that names the entry and the key, before any model is built.
"""

REQUIRED_KEYS = ("instruction", "input", "output")


class DatasetError(ValueError):
    """The instruction data is not a JSON list of {instruction, input, output} strings."""


def validate_entries(data, source="dataset", keys=REQUIRED_KEYS):
    """Raise DatasetError naming the first bad entry; return the data unchanged.

    Each entry must be an object with a string under every one of `keys`.
    """
    if not isinstance(data, list):
        raise DatasetError(f"{source}: expected a JSON list of entries, got {type(data).__name__}")
    if not data:
        raise DatasetError(f"{source}: the list of entries is empty")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DatasetError(
                f"{source}: entry {i} is not a JSON object (got {type(entry).__name__})")
        for key in keys:
            if key not in entry:
                raise DatasetError(f"{source}: entry {i} has no '{key}' key")
            if not isinstance(entry[key], str):
                raise DatasetError(
                    f"{source}: entry {i}: '{key}' must be a string, "
                    f"got {type(entry[key]).__name__}"
                )
    return data


def split_data(data, train_frac=0.85, test_frac=0.1):
    """The chapter's split, in order: the first 85% train, the next 10% test, the rest validation."""
    train_portion = int(len(data) * train_frac)
    test_portion = int(len(data) * test_frac)
    train_data = data[:train_portion]
    test_data = data[train_portion:train_portion + test_portion]
    val_data = data[train_portion + test_portion:]
    for name, split in (("training", train_data), ("test", test_data), ("validation", val_data)):
        if not split:
            raise DatasetError(f"The {name} split is empty: {len(data)} entries are too few "
                               f"(an 85/10/5 split needs at least 10).")
    return train_data, test_data, val_data
