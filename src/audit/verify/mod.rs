//! The audit-log verifier behind `apple-api-proxy audit verify`. It owns the rules that decide
//! whether one log, or a rotated series of logs, is the unbroken hash chain the writer
//! produced. When it is not, it diagnoses what happened and names the first bad line. It is
//! pure apart from opening the files it is given ([`verify_files`]); the core,
//! `verify_reader`, reads any `BufRead`.
//!
//! # The chain
//!
//! Each line is one JSON object ending in `\n`. It carries an integer `seq` (+1 per line,
//! continuing across rotated files) and a `prev_sha256`: the lowercase hex SHA-256 of the
//! previous line's bytes without their newline. The first line of a new chain has seq 1 and
//! a `prev_sha256` of 64 zeros. The verifier hashes exactly the raw bytes between newlines,
//! so tampered bytes, including invalid UTF-8, are still hashed and linked as they are.
//!
//! # Diagnosis
//!
//! When a line does not continue the one before it, the verifier looks at three lines: the
//! previous line, this line and the next one. That tells apart an edited line (named itself,
//! even when the break only shows on the line after it), deleted lines (a forward jump in
//! seq), an inserted line (the next line continues from the previous one; a careful forgery
//! with the right seq and `prev_sha256` shows up as two lines claiming the same place), lines
//! that were swapped or reordered, a seq field that was changed, a chain restarted in the
//! middle, and a file that does not continue the file before it (missing, out of order or
//! given twice). A line with no newline at the end of a file is reported as truncated.
//!
//! # What a hash chain cannot show
//!
//! - **An edit of the very last line of the last file.** No line after it carries its hash.
//!   The same goes for lines removed from the end of the last file, a whole file dropped
//!   from the end of a series, and good-looking lines appended at the end. A forger who
//!   rewrites every line from some point to the end, recomputing each `prev_sha256`, also
//!   leaves a chain that verifies. Only an anchor kept somewhere else catches these: record
//!   [`Summary::last_sha256`] and [`Summary::last_seq`] elsewhere (another host, a ticket)
//!   and compare them with the next run.
//! - **Lines removed from the start of the first file given.** That file is accepted as
//!   continuing an earlier one, with a note in [`Summary::notes`]. Pass the whole series,
//!   oldest first, to check that link.
//! - **A break between the last two lines.** "Line K was edited" cannot be told from "line
//!   K+1's `prev_sha256` was edited" because nothing comes after K+1. The verifier names
//!   line K and its message mentions both lines.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;

use crate::{hex, sha256};

mod forensics;

/// The longest line accepted (without its newline): far above any real record, low enough
/// that a hostile file cannot exhaust memory.
pub(crate) const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// `prev_sha256` of the first line of a new chain.
const ZERO_SHA256: &str = super::GENESIS;

/// Reads one line into `buf` (cleared first): at most [`MAX_LINE_BYTES`] of content plus the
/// newline, which stays in `buf`. Returns the bytes read, 0 at the end of the input; a line
/// that ends without a newline was cut by the bound or by the end of the input. Shared by
/// every reader of audit lines (`verify`, `--head`, `audit report`).
pub(crate) fn read_line(input: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    buf.clear();
    let limit = u64::try_from(MAX_LINE_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    input.take(limit).read_until(b'\n', buf)
}

/// The only record version this verifier knows.
const VERSION: u64 = 1;

/// Outcome of verifying files given in chain order (oldest first).
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    /// Files checked (empty ones included).
    pub files: usize,
    /// Lines checked, all files together.
    pub lines: u64,
    /// `seq` of the first line (`None` when every file was empty).
    pub first_seq: Option<u64>,
    /// `seq` of the last line.
    pub last_seq: Option<u64>,
    /// SHA-256 of the last line: the anchor to keep elsewhere (see the module docs).
    pub last_sha256: Option<String>,
    /// Things a reviewer should know that are not failures (empty files, a series that
    /// starts in the middle of a chain).
    pub notes: Vec<String>,
}

/// The first bad line, and what is wrong with it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{file}: line {line}: {problem}")]
pub struct Failure {
    /// The file as it was named to the verifier.
    pub file: String,
    /// 1-based within that file; 0 when the file could not be opened or read.
    pub line: u64,
    /// What is wrong, in words for a security reviewer.
    pub problem: String,
}

/// Where the chain stands between files: whether it has started, and the seq and
/// `prev_sha256` the next line must carry. Also collects the figures for the [`Summary`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ChainState {
    last: Option<Link>,
    first_seq: Option<u64>,
    lines: u64,
    notes: Vec<String>,
}

/// The last accepted line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    file: String,
    line: u64,
    seq: u64,
    prev: String,
    sha256: String,
}

impl ChainState {
    /// A state before any line: the next line may start a chain or continue one.
    pub fn new() -> ChainState {
        ChainState::default()
    }

    /// The figures for `files` files verified with this state.
    pub(crate) fn into_summary(self, files: usize) -> Summary {
        let (last_seq, last_sha256) = match self.last {
            Some(l) => (Some(l.seq), Some(l.sha256)),
            None => (None, None),
        };
        Summary {
            files,
            lines: self.lines,
            first_seq: self.first_seq,
            last_seq,
            last_sha256,
            notes: self.notes,
        }
    }
}

/// Verifies `paths` as one chain, oldest first (`audit.jsonl.2 audit.jsonl.1 audit.jsonl`).
/// Returns the first bad line. A file that cannot be opened or read fails with line 0.
pub fn verify_files(paths: &[PathBuf]) -> Result<Summary, Failure> {
    if paths.is_empty() {
        return Err(Failure {
            file: "(no file)".to_owned(),
            line: 0,
            problem: "no audit log given: nothing was verified".to_owned(),
        });
    }
    let mut state = ChainState::new();
    for path in paths {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| Failure {
            file: name.clone(),
            line: 0,
            problem: format!("cannot open: {e}"),
        })?;
        verify_reader(&name, BufReader::new(file), &mut state)?;
    }
    Ok(state.into_summary(paths.len()))
}

/// The SHA-256 of the line whose `seq` is `seq`, searching `paths` in order: what
/// `audit verify --head SEQ:SHA256` compares with a head recorded elsewhere (DESIGN §19).
/// `Ok(None)` when no line has that seq (a cut tail, if the head is newer than the log).
pub fn line_sha256(paths: &[PathBuf], seq: u64) -> Result<Option<String>, Failure> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    for path in paths {
        let name = path.display().to_string();
        let fail = |line: u64, e: std::io::Error| Failure {
            file: name.clone(),
            line,
            problem: format!("cannot read: {e}"),
        };
        let mut reader = BufReader::new(File::open(path).map_err(|e| fail(0, e))?);
        let mut buf = Vec::new();
        let mut number = 0;
        loop {
            let n = read_line(&mut reader, &mut buf).map_err(|e| fail(number, e))?;
            if n == 0 {
                break;
            }
            number += 1;
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            if serde_json::from_slice::<Seq>(&buf).is_ok_and(|s| s.seq == seq) {
                return Ok(Some(hex(&sha256(&buf))));
            }
        }
    }
    Ok(None)
}

/// [`verify_reader`] over bytes, for the fuzz target.
#[cfg(test)]
pub(crate) fn verify_bytes_for_fuzz(bytes: &[u8], state: &mut ChainState) -> Result<u64, Failure> {
    verify_reader("fuzz", bytes, state)
}

/// Verifies one file's lines as the continuation of `state`. `name` is only used in
/// failures and notes. Returns the number of lines in the file. Call it once per file,
/// oldest first, with the same `state`.
fn verify_reader(name: &str, input: impl BufRead, state: &mut ChainState) -> Result<u64, Failure> {
    let mut lines = Lines {
        input,
        no: 0,
        done: false,
    };
    let mut count = 0;
    let mut current = lines.next_item();
    while let Some(item) = current {
        let next = lines.next_item();
        match item {
            Item::Line(line) => {
                check_line(name, &line, &Ahead::of(next.as_ref()), state)?;
                count = line.no;
            }
            Item::TooLong { no } => {
                return Err(Failure {
                    file: name.to_owned(),
                    line: no,
                    problem: format!(
                        "not a valid audit record: longer than {} MiB",
                        MAX_LINE_BYTES >> 20
                    ),
                })
            }
            Item::Unreadable { no, error } => {
                return Err(Failure {
                    file: name.to_owned(),
                    line: 0,
                    problem: format!("cannot read line {no}: {error}"),
                })
            }
        }
        current = next;
    }
    if count == 0 {
        state
            .notes
            .push(format!("file {name} is empty: it holds no lines to check"));
    }
    Ok(count)
}

// ---------------------------------------------------------------------------------------
// Reading lines.

/// A line as read: its raw bytes' hash and, if it parses, its chain fields.
struct Line {
    /// 1-based within the file.
    no: u64,
    /// Whether it ended in `\n` (only the last line of a file can lack it).
    terminated: bool,
    /// Hex SHA-256 of the bytes without the newline.
    sha256: String,
    /// The chain fields, or why the line is not a record.
    body: Result<Record, String>,
}

/// The chain fields of a line.
struct Record {
    seq: u64,
    prev: String,
}

enum Item {
    Line(Line),
    /// Longer than [`MAX_LINE_BYTES`]; reading stops there.
    TooLong {
        no: u64,
    },
    /// An I/O error while reading this line; reading stops there.
    Unreadable {
        no: u64,
        error: String,
    },
}

/// Splits input into raw lines, bounded in length.
struct Lines<R> {
    input: R,
    no: u64,
    done: bool,
}

impl<R: BufRead> Lines<R> {
    fn next_item(&mut self) -> Option<Item> {
        if self.done {
            return None;
        }
        self.no = self.no.saturating_add(1);
        let no = self.no;
        let mut bytes = Vec::new();
        match read_line(&mut self.input, &mut bytes) {
            Ok(0) => {
                self.done = true;
                None
            }
            Ok(_) => {
                let terminated = bytes.last() == Some(&b'\n');
                if terminated {
                    bytes.pop();
                } else {
                    // Either the end of the input or the length limit: nothing follows.
                    self.done = true;
                    if bytes.len() > MAX_LINE_BYTES {
                        return Some(Item::TooLong { no });
                    }
                }
                Some(Item::Line(Line {
                    no,
                    terminated,
                    sha256: hex(&sha256(&bytes)),
                    body: parse(&bytes),
                }))
            }
            Err(e) => {
                self.done = true;
                Some(Item::Unreadable {
                    no,
                    error: e.to_string(),
                })
            }
        }
    }
}

/// The chain fields of one line, or why it is not an audit record.
fn parse(bytes: &[u8]) -> Result<Record, String> {
    let invalid = |why: String| format!("not a valid audit record: {why}");
    if bytes.is_empty() {
        return Err(invalid("the line is empty".to_owned()));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Eof => "JSON that ends early",
            _ => "malformed JSON",
        };
        invalid(format!("{what} at column {}", e.column()))
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err(invalid(format!(
            "{} instead of a JSON object",
            kind(&value)
        )));
    };
    let seq = match map.get("seq") {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| invalid(format!("`seq` is {}, not a non-negative integer", kind(v))))?,
        None => return Err(invalid("no `seq`".to_owned())),
    };
    let prev = match map.get("prev_sha256") {
        Some(serde_json::Value::String(s)) if is_sha256_hex(s) => s.clone(),
        Some(serde_json::Value::String(_)) => {
            return Err(invalid(
                "`prev_sha256` is not 64 lowercase hex digits".to_owned(),
            ))
        }
        Some(v) => return Err(invalid(format!("`prev_sha256` is {}", kind(v)))),
        None => return Err(invalid("no `prev_sha256`".to_owned())),
    };
    if let Some(v) = map.get("version") {
        if v.as_u64() != Some(VERSION) {
            return Err(format!(
                "unsupported record version {} (this verifier knows version {VERSION})",
                brief(v)
            ));
        }
    }
    Ok(Record { seq, prev })
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// "a string", "an array"…: what a JSON value is, for messages.
fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A JSON value in at most about 40 characters, for messages.
fn brief(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(40) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s,
    }
}

/// The first 12 hex digits of a hash, for messages.
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

// ---------------------------------------------------------------------------------------
// Checking the chain.

/// What follows the line being checked: the evidence that tells an edit from an insertion.
enum Ahead<'a> {
    /// Nothing: this is the file's last line.
    End,
    /// A line that is not a record (or could not be read).
    Invalid,
    /// A record, with its hash.
    Record { rec: &'a Record, sha256: &'a str },
}

impl<'a> Ahead<'a> {
    fn of(item: Option<&'a Item>) -> Ahead<'a> {
        match item {
            None => Ahead::End,
            Some(Item::Line(Line {
                body: Ok(rec),
                sha256,
                ..
            })) => Ahead::Record { rec, sha256 },
            Some(_) => Ahead::Invalid,
        }
    }
}

/// Checks one line of file `name` against the chain and, if it holds, moves the chain on.
fn check_line(
    name: &str,
    line: &Line,
    next: &Ahead<'_>,
    state: &mut ChainState,
) -> Result<(), Failure> {
    let here = |problem: String| Failure {
        file: name.to_owned(),
        line: line.no,
        problem,
    };
    let rec = match &line.body {
        Ok(rec) => rec,
        Err(problem) if line.terminated => return Err(here(problem.clone())),
        Err(problem) => {
            return Err(here(format!(
                "truncated: the last line has no newline ({problem})"
            )))
        }
    };
    if let Err(failure) = check_link(name, line, rec, next, state) {
        let names_this_line = failure.file == name && failure.line == line.no;
        if line.terminated || !names_this_line {
            return Err(failure);
        }
        return Err(here(format!(
            "truncated: the last line has no newline (and {})",
            failure.problem
        )));
    }
    if !line.terminated {
        return Err(here("truncated: the last line has no newline".to_owned()));
    }
    if state.first_seq.is_none() {
        state.first_seq = Some(rec.seq);
    }
    state.lines = state.lines.saturating_add(1);
    state.last = Some(Link {
        file: name.to_owned(),
        line: line.no,
        seq: rec.seq,
        prev: rec.prev.clone(),
        sha256: line.sha256.clone(),
    });
    Ok(())
}

/// Whether `rec` (line `line.no` of `name`) continues the chain; if not, which line is to
/// blame and why ([`forensics::blame`]).
fn check_link(
    name: &str,
    line: &Line,
    rec: &Record,
    next: &Ahead<'_>,
    state: &mut ChainState,
) -> Result<(), Failure> {
    let Some(p) = &state.last else {
        // The first line of the chain: a new chain, or the continuation of a file not given.
        if rec.prev == ZERO_SHA256 {
            if rec.seq != 1 {
                return Err(Failure {
                    file: name.to_owned(),
                    line: line.no,
                    problem: format!(
                        "a new chain must start at seq 1, but this line (prev_sha256 all zeros) has seq {}",
                        rec.seq
                    ),
                });
            }
        } else {
            state.notes.push(format!(
                "file {name} starts at seq {}, continuing an earlier file not given; pass the files oldest first to check the link",
                rec.seq
            ));
        }
        return Ok(());
    };

    let continues = p.seq.checked_add(1) == Some(rec.seq) && rec.prev == p.sha256;
    if continues {
        return Ok(());
    }
    Err(forensics::blame(name, line, rec, next, p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const N: usize = 8;

    fn h(line: &str) -> String {
        hex(&sha256(line.as_bytes()))
    }

    fn record(seq: u64, x: &str, prev: &str) -> String {
        format!(r#"{{"version":1,"seq":{seq},"x":"{x}","prev_sha256":"{prev}"}}"#)
    }

    /// `n` valid lines from `first_seq`, the first linking to `prev`.
    fn chain_from(first_seq: u64, prev: &str, n: usize) -> Vec<String> {
        let mut prev = prev.to_owned();
        (0..n as u64)
            .map(|i| {
                let line = record(first_seq + i, &format!("request {}", first_seq + i), &prev);
                prev = h(&line);
                line
            })
            .collect()
    }

    fn chain(n: usize) -> Vec<String> {
        chain_from(1, ZERO_SHA256, n)
    }

    fn text(lines: &[String]) -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| format!("{l}\n").into_bytes())
            .collect()
    }

    /// Verifies in-memory files as one series.
    fn run(files: &[(&str, &[u8])]) -> Result<Summary, Failure> {
        let mut state = ChainState::new();
        for (name, bytes) in files {
            verify_reader(name, *bytes, &mut state)?;
        }
        Ok(state.into_summary(files.len()))
    }

    /// Asserts a failure at `file`:`line` whose message contains `needle`.
    fn assert_fails(result: Result<Summary, Failure>, file: &str, line: u64, needle: &str) {
        match result {
            Err(f) => {
                assert_eq!((f.file.as_str(), f.line), (file, line), "{f}");
                assert!(
                    f.problem.contains(needle),
                    "{f:?} should mention {needle:?}"
                );
            }
            Ok(s) => panic!("expected a failure at {file}:{line}, got {s:?}"),
        }
    }

    #[test]
    fn an_untouched_chain_passes_with_its_figures() {
        let lines = chain(N);
        let summary = run(&[("audit.jsonl", &text(&lines))]).unwrap();
        assert_eq!(
            summary,
            Summary {
                files: 1,
                lines: N as u64,
                first_seq: Some(1),
                last_seq: Some(N as u64),
                last_sha256: Some(h(&lines[N - 1])),
                notes: vec![],
            }
        );
    }

    #[test]
    fn a_single_line_chain_passes() {
        let summary = run(&[("a", &text(&chain(1)))]).unwrap();
        assert_eq!(
            (summary.lines, summary.first_seq, summary.last_seq),
            (1, Some(1), Some(1))
        );
    }

    /// Each tampering of one 8-line file (seq 1..=8): the line named and a word of the message.
    #[test]
    fn each_tampering_is_caught_at_the_right_line() {
        type Tamper = fn(Vec<String>) -> Vec<u8>;
        let cases: &[(&str, Tamper, u64, &str)] = &[
            (
                "edit a middle line's field",
                |mut l| {
                    l[3] = l[3].replace("request 4", "request 44");
                    text(&l)
                },
                4,
                "edited: its hash no longer matches the next line's prev_sha256",
            ),
            (
                "edit the first line's field",
                |mut l| {
                    l[0] = l[0].replace("request 1", "request 11");
                    text(&l)
                },
                1,
                "edited: its hash no longer matches",
            ),
            (
                "edit a line's prev_sha256",
                |mut l| {
                    let forged = h("something else");
                    l[3] = record(4, "request 4", &forged);
                    text(&l)
                },
                4,
                "its prev_sha256 does not match the hash of line 3",
            ),
            (
                "edit the second-to-last line",
                |mut l| {
                    l[N - 2] = l[N - 2].replace("request", "REQUEST");
                    text(&l)
                },
                N as u64 - 1,
                "line 8",
            ),
            (
                "edit the last line's prev_sha256",
                |mut l| {
                    l[N - 1] = record(N as u64, "request 8", &h("forged"));
                    text(&l)
                },
                N as u64 - 1,
                "cannot tell which",
            ),
            (
                "edit a line's seq",
                |mut l| {
                    l[3] = l[3].replace("\"seq\":4", "\"seq\":40");
                    text(&l)
                },
                4,
                "edited: its seq was changed to 40",
            ),
            (
                "edit a line's seq into a string",
                |mut l| {
                    l[3] = l[3].replace("\"seq\":4", "\"seq\":\"4\"");
                    text(&l)
                },
                4,
                "not a valid audit record: `seq` is a string",
            ),
            (
                "edit a line's version",
                |mut l| {
                    l[3] = l[3].replace("\"version\":1", "\"version\":2");
                    text(&l)
                },
                4,
                "unsupported record version 2",
            ),
            (
                "delete a middle line",
                |mut l| {
                    l.remove(3);
                    text(&l)
                },
                4,
                "seq jumps from 3 to 5: 1 line(s) deleted before this line",
            ),
            (
                "delete three middle lines",
                |mut l| {
                    l.drain(3..6);
                    text(&l)
                },
                4,
                "seq jumps from 3 to 7: 3 line(s) deleted",
            ),
            (
                "insert a forged line with the right seq and prev_sha256",
                |mut l| {
                    let forged = record(4, "forged", &h(&l[2]));
                    l.insert(3, forged);
                    text(&l)
                },
                4,
                "inserted: line 5 has the same seq 4",
            ),
            (
                "insert a forged line with a made-up seq",
                |mut l| {
                    l.insert(3, record(99, "forged", &h("x")));
                    text(&l)
                },
                4,
                "inserted: seq 99 does not belong here (expected 4)",
            ),
            (
                "insert a copy of a line after it",
                |mut l| {
                    let copy = l[2].clone();
                    l.insert(3, copy);
                    text(&l)
                },
                4,
                "duplicate of line 3",
            ),
            (
                "insert a copy of an earlier line",
                |mut l| {
                    let copy = l[1].clone();
                    l.insert(5, copy);
                    text(&l)
                },
                6,
                "inserted: seq 2 does not belong here",
            ),
            (
                "append a forged line that goes back",
                |mut l| {
                    l.push(record(3, "forged", &h("y")));
                    text(&l)
                },
                N as u64 + 1,
                "seq 3 repeats or goes back (expected 9)",
            ),
            (
                "insert a forged line as the second-to-last",
                |mut l| {
                    let forged = record(N as u64, "forged", &h(&l[N - 2]));
                    l.insert(N - 1, forged);
                    text(&l)
                },
                N as u64,
                "one of them was inserted",
            ),
            (
                "swap two lines",
                |mut l| {
                    l.swap(3, 4);
                    text(&l)
                },
                4,
                "reordered: this line (seq 5) and the next (seq 4) were swapped",
            ),
            (
                "swap the last two lines",
                |mut l| {
                    l.swap(N - 2, N - 1);
                    text(&l)
                },
                N as u64 - 1,
                "reordered",
            ),
            (
                "move a line earlier",
                |mut l| {
                    let moved = l.remove(6);
                    l.insert(2, moved);
                    text(&l)
                },
                3,
                "inserted: seq 7 does not belong here (expected 3)",
            ),
            (
                "reverse three lines",
                |mut l| {
                    l[3..6].reverse();
                    text(&l)
                },
                4,
                "reordered: seq 6 is followed by seq 5",
            ),
            (
                "move a line later",
                |mut l| {
                    let moved = l.remove(2);
                    l.insert(5, moved);
                    text(&l)
                },
                3,
                "seq jumps from 2 to 4",
            ),
            (
                "restart the chain in the middle",
                |mut l| {
                    let restarted = chain(4);
                    l.truncate(4);
                    l.extend(restarted);
                    text(&l)
                },
                5,
                "a new chain starts here",
            ),
            (
                "truncate the last line",
                |l| {
                    let mut t = text(&l);
                    t.truncate(t.len() - 20);
                    t
                },
                N as u64,
                "truncated: the last line has no newline",
            ),
            (
                "remove only the final newline",
                |l| {
                    let mut t = text(&l);
                    t.pop();
                    t
                },
                N as u64,
                "truncated: the last line has no newline",
            ),
            (
                "append a line that goes back, without a newline",
                |mut l| {
                    l.push(record(3, "forged", &h("z")));
                    let mut t = text(&l);
                    t.pop();
                    t
                },
                N as u64 + 1,
                "truncated: the last line has no newline (and seq 3 repeats or goes back",
            ),
            (
                "edit the second-to-last line and remove the final newline",
                |mut l| {
                    l[N - 2] = l[N - 2].replace("request", "REQUEST");
                    let mut t = text(&l);
                    t.pop();
                    t
                },
                N as u64 - 1,
                "edited: its hash no longer matches",
            ),
            (
                "append garbage",
                |l| {
                    let mut t = text(&l);
                    t.extend_from_slice(b"garbage\n");
                    t
                },
                N as u64 + 1,
                "not a valid audit record: malformed JSON",
            ),
            (
                "append garbage without a newline",
                |l| {
                    let mut t = text(&l);
                    t.extend_from_slice(b"{\"seq\":9,");
                    t
                },
                N as u64 + 1,
                "truncated: the last line has no newline (not a valid audit record",
            ),
            (
                "insert a blank line",
                |mut l| {
                    l.insert(3, String::new());
                    text(&l)
                },
                4,
                "not a valid audit record: the line is empty",
            ),
            (
                "insert a JSON array",
                |mut l| {
                    l.insert(3, "[1,2]".to_owned());
                    text(&l)
                },
                4,
                "an array instead of a JSON object",
            ),
            (
                "make a line invalid UTF-8",
                |l| {
                    let mut t = text(&l);
                    let at = t.windows(9).position(|w| w == b"request 4").unwrap_or(0);
                    t[at] = 0xff;
                    t
                },
                4,
                "not UTF-8",
            ),
            (
                "uppercase a prev_sha256",
                |mut l| {
                    let (head, prev) = l[3].split_at(l[3].len() - 66);
                    l[3] = format!("{head}{}", prev.to_uppercase());
                    text(&l)
                },
                4,
                "`prev_sha256` is not 64 lowercase hex digits",
            ),
            (
                "start a new chain at seq 2",
                |mut l| {
                    l[0] = record(2, "request 1", ZERO_SHA256);
                    text(&l)
                },
                1,
                "a new chain must start at seq 1",
            ),
        ];
        for (what, tamper, line, needle) in cases {
            let bytes = tamper(chain(N));
            let result = run(&[("audit.jsonl", &bytes)]);
            match &result {
                Err(f) => {
                    assert_eq!(f.line, *line, "{what}: {f}");
                    assert!(
                        f.problem.contains(needle),
                        "{what}: {f} should mention {needle:?}"
                    );
                }
                Ok(s) => panic!("{what}: not caught: {s:?}"),
            }
        }
    }

    /// The limits the module docs state: no successor, no anchor.
    #[test]
    fn what_a_chain_cannot_show_passes() {
        let mut lines = chain(N);
        lines[N - 1] = lines[N - 1].replace("request 8", "edited");
        assert!(run(&[("a", &text(&lines))]).is_ok(), "last line edited");
        let lines = chain(N);
        assert!(
            run(&[("a", &text(&lines[..N - 2]))]).is_ok(),
            "tail removed"
        );
        let summary = run(&[("a", &text(&lines[3..]))]).unwrap();
        assert_eq!(summary.first_seq, Some(4));
        assert_eq!(
            summary.notes,
            ["file a starts at seq 4, continuing an earlier file not given; pass the files oldest first to check the link"]
        );
    }

    /// audit.jsonl.2 (1..=4), audit.jsonl.1 (5..=8), audit.jsonl (9..=12).
    fn series() -> [Vec<String>; 3] {
        let all = chain(12);
        [all[..4].to_vec(), all[4..8].to_vec(), all[8..].to_vec()]
    }

    #[test]
    fn a_rotated_series_passes() {
        let [a, b, c] = series();
        let summary = run(&[("f2", &text(&a)), ("f1", &text(&b)), ("f0", &text(&c))]).unwrap();
        assert_eq!(
            summary,
            Summary {
                files: 3,
                lines: 12,
                first_seq: Some(1),
                last_seq: Some(12),
                last_sha256: Some(h(&c[3])),
                notes: vec![],
            }
        );
    }

    #[test]
    fn a_series_link_is_checked() {
        let [a, b, c] = series();
        let (a, b, c) = (text(&a), text(&b), text(&c));
        // A file missing from the middle.
        assert_fails(
            run(&[("f2", &a), ("f0", &c)]),
            "f0",
            1,
            "does not continue f2 (expected seq 5, prev_sha256 ",
        );
        assert_fails(
            run(&[("f2", &a), ("f0", &c)]),
            "f0",
            1,
            "4 line(s) missing between the files",
        );
        // Out of order.
        assert_fails(
            run(&[("f2", &a), ("f0", &c), ("f1", &b)]),
            "f0",
            1,
            "does not continue f2",
        );
        assert_fails(
            run(&[("f1", &b), ("f2", &a)]),
            "f2",
            1,
            "does not continue f1 (expected seq 9",
        );
        assert_fails(
            run(&[("f1", &b), ("f0", &c), ("f2", &a)]),
            "f2",
            1,
            "it starts a new chain",
        );
        // Given twice.
        assert_fails(
            run(&[("f2", &a), ("f2", &a)]),
            "f2",
            1,
            "the files are out of order (the oldest comes first) or one was given twice",
        );
        assert_fails(
            run(&[("f2", &a), ("f1", &b), ("f1", &b)]),
            "f1",
            1,
            "going back",
        );
        // A later file alone: accepted, with a note.
        let summary = run(&[("f1", &b)]).unwrap();
        assert_eq!(summary.notes.len(), 1);
        assert!(summary.notes[0].starts_with("file f1 starts at seq 5, continuing"));
    }

    #[test]
    fn tampering_across_a_rotation_is_caught() {
        let [a, b, c] = series();
        // Delete line 1 of the second file.
        assert_fails(
            run(&[("f2", &text(&a)), ("f1", &text(&b[1..])), ("f0", &text(&c))]),
            "f1",
            1,
            "1 line(s) missing between the files",
        );
        // Edit the last line of the first file: the next file's first line shows it.
        let mut edited = a.clone();
        edited[3] = edited[3].replace("request", "REQUEST");
        assert_fails(
            run(&[("f2", &text(&edited)), ("f1", &text(&b)), ("f0", &text(&c))]),
            "f2",
            4,
            "edited: its hash no longer matches the next line's prev_sha256 (line 1 of f1",
        );
        // Edit the first line of the second file's prev_sha256.
        let mut edited = b.clone();
        edited[0] = record(5, "request 5", &h("forged"));
        assert_fails(
            run(&[("f2", &text(&a)), ("f1", &text(&edited)), ("f0", &text(&c))]),
            "f1",
            1,
            "does not continue f2",
        );
        // Edit the last line of the middle file.
        let mut edited = b.clone();
        edited[3] = edited[3].replace("request", "REQUEST");
        assert_fails(
            run(&[("f2", &text(&a)), ("f1", &text(&edited)), ("f0", &text(&c))]),
            "f1",
            4,
            "edited",
        );
        // A truncated last line of a rotated file (not only the last file).
        let mut cut = text(&a);
        cut.pop();
        assert_fails(
            run(&[("f2", &cut), ("f1", &text(&b))]),
            "f2",
            4,
            "truncated",
        );
    }

    #[test]
    fn empty_files_are_noted_not_failed() {
        let summary = run(&[("empty", b"")]).unwrap();
        assert_eq!(
            summary,
            Summary {
                files: 1,
                lines: 0,
                first_seq: None,
                last_seq: None,
                last_sha256: None,
                notes: vec!["file empty is empty: it holds no lines to check".to_owned()],
            }
        );
        let [a, b, c] = series();
        let summary = run(&[
            ("f3", b""),
            ("f2", &text(&a)),
            ("e", b""),
            ("f1", &text(&b)),
            ("f0", &text(&c)),
        ])
        .unwrap();
        assert_eq!(
            (summary.files, summary.lines, summary.notes.len()),
            (5, 12, 2)
        );
        // The link is still checked across an empty file, and named by the last file with lines.
        assert_fails(
            run(&[("f2", &text(&a)), ("e", b""), ("f0", &text(&c))]),
            "f0",
            1,
            "does not continue f2",
        );
    }

    #[test]
    fn chain_state_reports_where_the_chain_stands() {
        let lines = chain(3);
        let mut state = ChainState::new();
        assert!(state.last.is_none());
        assert_eq!(
            verify_reader("a", text(&lines).as_slice(), &mut state),
            Ok(3)
        );
        let summary = state.into_summary(1);
        assert_eq!(summary.last_seq, Some(3));
        assert_eq!(summary.last_sha256.as_deref(), Some(h(&lines[2]).as_str()));
        assert_eq!(summary.lines, 3);
        assert!(summary.notes.is_empty());
    }

    #[test]
    fn seq_at_the_top_of_u64_has_no_successor() {
        let top = record(u64::MAX, "top", &h("earlier"));
        let after = record(0, "after", &h(&top));
        let bytes = text(&[top, after]);
        assert_fails(run(&[("a", &bytes)]), "a", 2, "the largest possible");
    }

    #[test]
    fn an_overlong_line_fails_without_reading_it_all() {
        let mut bytes = text(&chain(2));
        bytes.extend(std::iter::repeat_n(b'a', MAX_LINE_BYTES + 1));
        bytes.push(b'\n');
        assert_fails(run(&[("a", &bytes)]), "a", 3, "longer than 16 MiB");
        // Exactly at the limit is read (and fails only as JSON).
        let mut bytes = text(&chain(2));
        bytes.extend(std::iter::repeat_n(b'a', MAX_LINE_BYTES));
        bytes.push(b'\n');
        assert_fails(run(&[("a", &bytes)]), "a", 3, "malformed JSON");
    }

    #[test]
    fn a_read_error_fails_with_line_0() {
        struct Broken(usize);
        impl Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("disk on fire"));
                }
                let line = text(&chain(1));
                let n = line.len().min(buf.len());
                buf[..n].copy_from_slice(&line[..n]);
                self.0 -= 1;
                Ok(n)
            }
        }
        let mut state = ChainState::new();
        let result = verify_reader("a", BufReader::new(Broken(1)), &mut state);
        assert_eq!(
            result,
            Err(Failure {
                file: "a".to_owned(),
                line: 0,
                problem: "cannot read line 2: disk on fire".to_owned()
            })
        );
    }

    // -- On real files.

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn files_in_a_rotated_series_pass_and_tampering_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let [a, b, c] = series();
        let p2 = write(&dir, "audit.jsonl.2", &text(&a));
        let p1 = write(&dir, "audit.jsonl.1", &text(&b));
        let p0 = write(&dir, "audit.jsonl", &text(&c));
        let summary = verify_files(&[p2.clone(), p1.clone(), p0.clone()]).unwrap();
        assert_eq!(
            (summary.files, summary.lines, summary.last_seq),
            (3, 12, Some(12))
        );
        assert_eq!(summary.last_sha256, Some(h(&c[3])));

        let out_of_order = verify_files(&[p2.clone(), p0.clone(), p1.clone()]).unwrap_err();
        assert_eq!(
            (out_of_order.file, out_of_order.line),
            (p0.display().to_string(), 1)
        );

        let mut edited = b.clone();
        edited[1] = edited[1].replace("request 6", "request 66");
        write(&dir, "audit.jsonl.1", &text(&edited));
        let failure = verify_files(&[p2, p1.clone(), p0]).unwrap_err();
        assert_eq!(
            (failure.file.clone(), failure.line),
            (p1.display().to_string(), 2)
        );
        assert_eq!(
            failure.to_string(),
            format!(
                "{}: line 2: edited: its hash no longer matches the next line's prev_sha256 (line 3, which the line after it still links to)",
                p1.display()
            )
        );
    }

    #[test]
    fn files_that_cannot_be_read_fail_with_line_0() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl");
        let failure = verify_files(std::slice::from_ref(&missing)).unwrap_err();
        assert_eq!(
            (failure.file, failure.line),
            (missing.display().to_string(), 0)
        );
        assert!(
            failure.problem.starts_with("cannot open: "),
            "{}",
            failure.problem
        );

        let failure = verify_files(&[dir.path().to_path_buf()]).unwrap_err();
        assert_eq!(failure.line, 0);
        assert!(
            failure.problem.starts_with("cannot read line 1: "),
            "{}",
            failure.problem
        );

        let failure = verify_files(&[]).unwrap_err();
        assert_eq!(failure.line, 0);

        let empty = write(&dir, "empty.jsonl", b"");
        assert_eq!(verify_files(&[empty]).unwrap().lines, 0);
    }

    proptest! {
        /// Any single-byte change to any line but the last (its newline included) is caught,
        /// and the changed line is the one named.
        #[test]
        fn any_byte_changed_before_the_last_line_is_named(
            line in 0..N - 1,
            offset in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let lines = chain(N);
            let start: usize = lines[..line].iter().map(|l| l.len() + 1).sum();
            let at = start + offset.index(lines[line].len() + 1);
            let mut bytes = text(&lines);
            prop_assume!(bytes[at] != byte);
            bytes[at] = byte;
            let failure = run(&[("a", &bytes)]).unwrap_err();
            prop_assert_eq!(failure.line, line as u64 + 1, "{}", failure);
        }

        /// Arbitrary input never panics.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = run(&[("a", &bytes)]);
        }

        /// Arbitrary JSON-ish lines around a valid prefix never panic.
        #[test]
        fn arbitrary_records_never_panic(
            seqs in prop::collection::vec(any::<u64>(), 0..8),
            link in any::<bool>(),
        ) {
            let mut lines = chain(3);
            for seq in seqs {
                let prev = if link { h(&lines[lines.len() - 1]) } else { ZERO_SHA256.to_owned() };
                lines.push(record(seq, "p", &prev));
            }
            let _ = run(&[("a", &text(&lines))]);
        }
    }
}
