"""The runner's own output (stdout and stderr, where librknnrt prints its warnings), kept with every board
run (artifact `board/<mode>.log`), and the known librknnrt warnings in it turned into tags
`rkbench.warning.<name>`. Those in INVALIDATING make the run's latency INVALID in reports
(rkbench/report/validity.py): the run did not measure what its parameters say."""

from __future__ import annotations

import re

WARNING_TAG = "rkbench.warning."
# name -> the line librknnrt prints
KNOWN = {
    # the core mask was refused (a core the SoC lacks, or a model/runtime without multi-core): it ran on auto
    "core_mask_fallback": re.compile(r"^.*Not support core mask.*fallback to single core auto mode.*$", re.M),
    # the model was built by a newer rknn-toolkit2 than the board's librknnrt
    "model_version": re.compile(r"^.*Invalid RKNN model version.*$", re.M),
}
INVALIDATING = {
    WARNING_TAG + "core_mask_fallback": "librknnrt ignored the core mask and ran in single core auto mode",
}


def warnings(mode: str, output: str) -> dict[str, str]:
    """`rkbench.warning.<name>` -> `<mode>: <first such line>` for each known warning in the output."""
    found = {}
    for name, pattern in KNOWN.items():
        match = pattern.search(output)
        if match:
            found[WARNING_TAG + name] = f"{mode}: {match.group(0).strip()[:300]}"
    return found
