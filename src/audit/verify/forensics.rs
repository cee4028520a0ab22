//! Why a chain broke: given the previous line, the line that does not continue it and the
//! next one, tell an edited line from deleted, inserted, reordered or duplicated ones, a
//! changed seq, a restarted chain and files given out of order. The verifier in [`super`]
//! decides *whether* the chain holds on its own; this module only names the likeliest cause
//! for the reviewer, and is consulted only once a line fails.

use super::{short, Ahead, Failure, Line, Link, Record, ZERO_SHA256};

/// The failure to report for `rec` (line `line.no` of `name`), which does not continue `p`.
/// Diagnoses in this order: a restarted chain, a duplicate, an insertion or swap (the next
/// line continues from the previous one), an edited seq, an edited line (by where the next
/// line links), two lines claiming one place, a forward jump (deleted or reordered lines), a
/// step back (inserted or reordered lines).
pub(super) fn blame(name: &str, line: &Line, rec: &Record, next: &Ahead<'_>, p: &Link) -> Failure {
    // The first line of a later file continues the last line of an earlier one.
    let boundary = line.no == 1;
    let prev_at = if boundary {
        format!("line {} of {}", p.line, p.file)
    } else {
        format!("line {}", p.line)
    };
    let this_at = if boundary {
        format!("line 1 of {name}")
    } else {
        format!("line {}", line.no)
    };
    let here = |what: String| Failure {
        file: name.to_owned(),
        line: line.no,
        problem: if boundary {
            format!(
                "does not continue {} (expected seq {}, prev_sha256 {}…): {what}",
                p.file,
                p.seq.saturating_add(1),
                short(&p.sha256)
            )
        } else {
            what
        },
    };
    let blame_prev = |what: String| Failure {
        file: p.file.clone(),
        line: p.line,
        problem: what,
    };

    let Some(expected) = p.seq.checked_add(1) else {
        return here(format!(
            "follows seq {}, the largest possible: no line can come after it",
            p.seq
        ));
    };
    if rec.prev == ZERO_SHA256 {
        return here(if boundary {
            format!(
                "it starts a new chain (seq {}, prev_sha256 all zeros): the files are out of order (the oldest comes first) or one was given twice, or the chain was restarted here and nothing links this file to the one before",
                rec.seq
            )
        } else {
            format!(
                "a new chain starts here (seq {}, prev_sha256 all zeros) instead of continuing {prev_at}: the chain was restarted, so this line is not linked to anything before it",
                rec.seq
            )
        });
    }
    if line.sha256 == p.sha256 {
        return here(format!(
            "duplicate of {prev_at}: a line was inserted (repeated)"
        ));
    }
    if let Ahead::Record { rec: n, sha256 } = next {
        if n.seq == expected && n.prev == p.sha256 {
            if Some(rec.seq) == expected.checked_add(1) && rec.prev == *sha256 {
                return here(format!(
                    "reordered: this line (seq {}) and the next (seq {expected}) were swapped",
                    rec.seq
                ));
            }
            return here(format!(
                "inserted: seq {} does not belong here (expected {expected}), and the next line continues the chain from {prev_at}, so this line was inserted (or moved here from elsewhere)",
                rec.seq
            ));
        }
    }
    if rec.prev == p.sha256 {
        return here(format!(
            "edited: its seq was changed to {} (its prev_sha256 links it to {prev_at}, so it must be {expected})",
            rec.seq
        ));
    }
    if rec.seq == expected {
        // The seq chain holds but the hash link to the previous line is broken: either the
        // previous line was edited or this line's prev_sha256 was. The next line decides.
        return match next {
            Ahead::Record { rec: n, .. } if n.prev == line.sha256 => blame_prev(format!(
                "edited: its hash no longer matches the next line's prev_sha256 ({this_at}, which the line after it still links to)"
            )),
            Ahead::Record { .. } => here(format!(
                "edited: its prev_sha256 does not match the hash of {prev_at}, and the next line does not link to it either, so this line itself was changed"
            )),
            Ahead::End | Ahead::Invalid if !boundary => {
                let why = if matches!(next, Ahead::End) {
                    format!("{this_at} is the last line")
                } else {
                    format!("the line after {this_at} is not a valid record")
                };
                blame_prev(format!(
                    "edited: its hash no longer matches the next line's prev_sha256 — or the prev_sha256 of {this_at} was edited instead; {why}, so the chain cannot tell which of the two lines was changed"
                ))
            }
            Ahead::End | Ahead::Invalid => here(format!(
                "its prev_sha256 is {}…: either {prev_at} was edited or this line's prev_sha256 was, and with no valid line after this one the chain cannot tell which",
                short(&rec.prev)
            )),
        };
    }
    if rec.seq == p.seq && rec.prev == p.prev {
        // Two lines claim the same place; the one the chain continues from is genuine.
        return match next {
            Ahead::Record { rec: n, .. } if n.prev == line.sha256 => blame_prev(format!(
                "inserted: {this_at} has the same seq {} and prev_sha256 as this line, and the chain continues from {this_at}, so this line was inserted",
                rec.seq
            )),
            Ahead::End => blame_prev(format!(
                "inserted: this line and {this_at} (the last line) both claim seq {} after the same line; one of them was inserted, and with nothing after them the chain cannot tell which",
                rec.seq
            )),
            _ => here(format!(
                "inserted: this line repeats the seq {} and prev_sha256 of {prev_at}: a line was inserted",
                rec.seq
            )),
        };
    }
    if rec.seq > expected {
        if let Ahead::Record { rec: n, .. } = next {
            if n.seq < rec.seq {
                return here(format!(
                    "reordered: seq {} is followed by seq {} on the next line (expected {expected} here): lines were reordered",
                    rec.seq, n.seq
                ));
            }
        }
        let missing = rec.seq - expected;
        return here(if boundary {
            format!(
                "it starts at seq {}: {missing} line(s) missing between the files — deleted, or a file is missing or given out of order",
                rec.seq
            )
        } else {
            format!(
                "seq jumps from {} to {}: {missing} line(s) deleted before this line",
                p.seq, rec.seq
            )
        });
    }
    here(if boundary {
        format!(
            "it starts at seq {}, going back: the files are out of order, or one was given twice",
            rec.seq
        )
    } else {
        format!(
            "seq {} repeats or goes back (expected {expected}): a line was inserted or lines were reordered",
            rec.seq
        )
    })
}
