"""The data contract's checks on the records stages hand on (docs/DESIGN.md): candidates,
scores and objectives. Each raises common.InputError naming the file, the record and its id.
Reading and parsing JSONL is jsonl.py's; these check what the fields hold.
"""

import common
import judging


def where(path, i, rec):
    return f"{path}: record {i} (id {rec['id']})"


def check_candidates(path, records):
    """Each record's candidates: a list of objects with a string `text`."""
    for i, r in enumerate(records, 1):
        cands = r["candidates"]
        if not isinstance(cands, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) for c in cands
        ):
            raise common.InputError(f"{where(path, i, r)}: candidates must be a list of objects with a string 'text'")


def check_objectives(path, records):
    """All records name the same known objectives, [primary, "helpfulness"]; returns them."""
    first = records[0]["objectives"]
    for i, r in enumerate(records, 1):
        obj = r["objectives"]
        if not (
            isinstance(obj, list) and len(obj) == 2 and obj[0] in judging.PRIMARY_OBJECTIVES and obj[1] == "helpfulness"
        ):
            raise common.InputError(
                f"{where(path, i, r)}: unknown objectives {obj!r}; expected [harmlessness|honesty, helpfulness]"
            )
        if obj != first:
            raise common.InputError(
                f"{where(path, i, r)}: objectives {obj} differ from the first record's {first}; "
                "score the file in one run"
            )
    return first


def check_score(place, what, value, nullable=True):
    """A score as the contract has it: an integer 1..10, or null where nullable."""
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
        raise common.InputError(
            f"{place}: {what} must be an integer 1..10{' or null' if nullable else ''}, got {value!r}"
        )


def check_scored(path, records, nullable=True):
    """Each record: at least two candidates and a refined answer, each an object with a string
    `text` and scores score_a, score_b (integers 1..10, or null where nullable)."""
    for i, r in enumerate(records, 1):
        place = where(path, i, r)
        cands, ref = r["candidates"], r["refined"]
        if not isinstance(cands, list) or not all(isinstance(c, dict) for c in cands):
            raise common.InputError(f"{place}: candidates must be a list of objects")
        if len(cands) < 2:
            raise common.InputError(
                f"{place}: {len(cands)} candidate(s); a covariance needs at least two (sample.py --num-candidates)"
            )
        if not isinstance(ref, dict):
            raise common.InputError(f"{place}: refined must be an object with text, score_a and score_b")
        for what, c in [*((f"candidate {k + 1}", c) for k, c in enumerate(cands)), ("refined", ref)]:
            if not isinstance(c.get("text"), str):
                raise common.InputError(f"{place}: {what} has no string 'text'")
            for key in ("score_a", "score_b"):
                if key not in c:
                    raise common.InputError(f"{place}: {what} has no {key}; run score.py and refine.py first")
                check_score(place, f"{what}'s {key}", c[key], nullable)
