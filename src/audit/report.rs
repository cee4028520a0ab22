//! `apple-api-proxy audit report FILE…` (DESIGN §19): what a security reviewer reads instead
//! of the raw log — per client × key × API, requests by decision and by status, Apple's
//! 401/403 causes, first and last use; in-app signatures by kind and product; the chain's
//! markers — over a period (`--since`/`--until`).
//!
//! The files may be a rotated series, or several replicas' logs at once, in any order. Each
//! replica's files are their own chain: the files are put in order by their links (a file
//! continues another when its first line's `prev_sha256` is the hash of the other's last
//! line and its `seq` the next one), each chain is checked line by line while it is read,
//! and the rows of all chains are merged. A broken chain is named by file and line, the
//! report still prints, and the command exits 1.
//!
//! Streams: one line in memory at a time, aggregates bounded by the number of distinct
//! (client, key, API) and (client, kind, product) — a 1 GiB log is reported in bounded
//! memory. Prints nothing but names, counts, statuses, causes and times: never a token, a
//! secret or a signature (a record holds only their fingerprints, which are not printed).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::verify::{read_line, MAX_LINE_BYTES};
use super::writer::last_line;
use super::GENESIS;

/// The period a report covers: RFC 3339 UTC with milliseconds, as records carry `time`
/// (so that strings compare as times). `since` is inclusive, `until` exclusive.
#[derive(Debug, Clone, Default)]
pub struct Period {
    pub since: Option<String>,
    pub until: Option<String>,
}

impl Period {
    fn contains(&self, time: &str) -> bool {
        self.since.as_deref().is_none_or(|s| time >= s)
            && self.until.as_deref().is_none_or(|u| time < u)
    }
}

/// One request record, as far as the report reads it; markers have `event` instead.
#[derive(Deserialize)]
struct Line<'a> {
    seq: u64,
    #[serde(borrow)]
    prev_sha256: Cow<'a, str>,
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(default)]
    count: Option<u64>,
    #[serde(borrow, default)]
    client: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    api: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    decision: Option<Cow<'a, str>>,
    #[serde(default)]
    status: Option<u16>,
    #[serde(borrow, default)]
    diagnosis: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    signing: Option<SigningLine<'a>>,
}

#[derive(Deserialize)]
struct SigningLine<'a> {
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    product_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    skus: Option<Vec<Cow<'a, str>>>,
}

/// One (client, key, API) row.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Row {
    pub client: String,
    pub key: String,
    pub api: String,
    pub requests: u64,
    pub by_decision: BTreeMap<String, u64>,
    pub by_status: BTreeMap<String, u64>,
    pub by_cause: BTreeMap<String, u64>,
    pub first: String,
    pub last: String,
}

/// Signatures made, per client, kind and product.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Signatures {
    pub client: String,
    pub kind: String,
    pub product_id: String,
    pub count: u64,
}

/// The markers of DESIGN §13b: records lost (the sum of their counts) and restarts after a
/// cut tail (how many).
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Markers {
    pub records_lost: u64,
    pub resumed_after_truncation: u64,
}

/// One chain among the files: its files in order and the seq range read.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ChainSummary {
    pub files: Vec<String>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Whether its first line starts a chain (seq 1 after 64 zeros) rather than continuing
    /// files that were not given.
    pub from_genesis: bool,
    /// `ok`, or `broken at FILE line N: …`.
    pub status: String,
}

/// The whole report, in DESIGN §19's JSON shape (plus `chains`).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Report {
    pub records: u64,
    pub from: Option<String>,
    pub until: Option<String>,
    /// `ok`, or the first chain break: `broken at FILE line N: …`.
    pub chain: String,
    pub rows: Vec<Row>,
    pub signatures: Vec<Signatures>,
    pub markers: Markers,
    pub chains: Vec<ChainSummary>,
}

impl Report {
    pub fn chain_ok(&self) -> bool {
        self.chain == "ok"
    }
}

/// Why a report could not be made at all (a broken chain is not this: it is reported).
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("no audit log given")]
    NoFiles,
    #[error("{file}: {error}")]
    Read { file: String, error: io::Error },
}

/// Where each file starts and ends, to put the files in chain order.
struct Ends {
    path: PathBuf,
    name: String,
    first: Option<(u64, String)>,
    last: Option<(u64, String)>,
}

fn ends(path: &Path) -> Result<Ends, ReportError> {
    let name = path.display().to_string();
    let read = |error| ReportError::Read {
        file: name.clone(),
        error,
    };
    let mut reader = BufReader::new(File::open(path).map_err(read)?);
    let mut first = Vec::new();
    read_line(&mut reader, &mut first).map_err(read)?;
    let parse = |bytes: &[u8]| {
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        serde_json::from_slice::<Line<'_>>(bytes)
            .ok()
            .map(|l| (l.seq, l.prev_sha256.into_owned()))
    };
    let first = parse(&first);
    // A file whose tail cannot be read (a partial last line) gets no link: it starts a chain
    // of its own, and reading it reports the break.
    let last = last_line(path).ok().flatten().and_then(|bytes| {
        let seq = parse(&bytes)?.0;
        Some((seq, crate::hex(&crate::sha256(&bytes))))
    });
    Ok(Ends {
        path: path.to_path_buf(),
        name,
        first,
        last,
    })
}

/// The files in chains: each chain's files in order.
fn chains(mut files: Vec<Ends>) -> Vec<Vec<Ends>> {
    let follows = |a: &Ends, b: &Ends| match (&a.last, &b.first) {
        (Some((seq, sha)), Some((next, prev))) => *next == seq + 1 && prev == sha,
        _ => false,
    };
    let mut out = Vec::new();
    while !files.is_empty() {
        // A head: a file no other remaining file is followed by.
        let head = (0..files.len())
            .find(|&i| !(0..files.len()).any(|j| j != i && follows(&files[j], &files[i])))
            .unwrap_or(0);
        let mut chain = vec![files.remove(head)];
        while let Some(i) = files
            .iter()
            .position(|f| chain.last().is_some_and(|last| follows(last, f)))
        {
            chain.push(files.remove(i));
        }
        out.push(chain);
    }
    out
}

#[derive(Default)]
struct Totals {
    records: u64,
    from: Option<String>,
    until: Option<String>,
    rows: BTreeMap<(String, String, String), Row>,
    signatures: BTreeMap<(String, String, String), u64>,
    markers: Markers,
}

fn owned(s: &Option<Cow<'_, str>>) -> String {
    s.as_deref().unwrap_or("-").to_string()
}

impl Totals {
    fn add(&mut self, line: &Line<'_>, period: &Period) {
        let Some(time) = line.time.as_deref() else {
            return;
        };
        if !period.contains(time) {
            return;
        }
        match line.event.as_deref() {
            Some("records_lost") => {
                self.markers.records_lost += line.count.unwrap_or(0);
                return;
            }
            Some("resumed_after_truncation") => {
                self.markers.resumed_after_truncation += 1;
                return;
            }
            Some(_) => return,
            None => {}
        }
        self.records += 1;
        if self.from.as_deref().is_none_or(|f| time < f) {
            self.from = Some(time.to_string());
        }
        if self.until.as_deref().is_none_or(|u| time > u) {
            self.until = Some(time.to_string());
        }
        let client = line
            .client
            .as_deref()
            .unwrap_or("(unauthenticated)")
            .to_string();
        let id = (client, owned(&line.key), owned(&line.api));
        let row = self.rows.entry(id.clone()).or_insert_with(|| Row {
            client: id.0.clone(),
            key: id.1.clone(),
            api: id.2.clone(),
            first: time.to_string(),
            last: time.to_string(),
            ..Row::default()
        });
        row.requests += 1;
        *row.by_decision.entry(owned(&line.decision)).or_default() += 1;
        if let Some(status) = line.status {
            *row.by_status.entry(status.to_string()).or_default() += 1;
        }
        if let Some(cause) = &line.diagnosis {
            *row.by_cause.entry(cause.to_string()).or_default() += 1;
        }
        if time < row.first.as_str() {
            row.first = time.to_string();
        }
        if time > row.last.as_str() {
            row.last = time.to_string();
        }
        if line.decision.as_deref() == Some("signed") {
            if let Some(s) = &line.signing {
                let product = s
                    .product_id
                    .as_deref()
                    .or_else(|| s.skus.as_ref().and_then(|k| k.first()).map(|k| &**k))
                    .unwrap_or("-");
                *self
                    .signatures
                    .entry((id.0.clone(), s.kind.to_string(), product.to_string()))
                    .or_default() += 1;
            }
        }
    }
}

/// Reads `paths` (any order: rotated series and replicas together) and reports `period`.
pub fn report(paths: &[PathBuf], period: &Period) -> Result<Report, ReportError> {
    if paths.is_empty() {
        return Err(ReportError::NoFiles);
    }
    let files = paths
        .iter()
        .map(|p| ends(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut totals = Totals::default();
    let mut summaries = Vec::new();
    let mut buf = Vec::with_capacity(4096);
    let chains = chains(files);
    // A chain that starts mid-way (not at seq 1) after the point where another chain ends is
    // taken for that chain with lines missing at the seam — or edited, when the seq follows
    // on but the hash does not — rather than for a second replica: the safe reading. (Two
    // replicas whose early files were both left out look the same; the message says so.)
    let seams: Vec<Option<String>> = chains
        .iter()
        .map(|chain| {
            let head = chain.first()?;
            let (seq, prev) = head.first.as_ref()?;
            if *seq == 1 && prev == GENESIS {
                return None;
            }
            let (last, tail) = chains
                .iter()
                .filter(|other| !std::ptr::eq(*other, chain))
                .filter_map(|other| {
                    let tail = other.last()?;
                    let (last, _) = tail.last.as_ref()?;
                    (*last < *seq).then_some((*last, tail))
                })
                .max_by_key(|(last, _)| *last)?;
            Some(if last + 1 == *seq {
                format!(
                    "broken at {} line 1: seq {seq} follows {}'s last line, but its prev_sha256 is not that line's hash (a line at the seam was edited or removed)",
                    head.name, tail.name
                )
            } else {
                format!(
                    "broken at {} line 1: seq {seq} starts {} line(s) after {}'s last line (seq {last}): lines or files are missing (or these are two replicas and the files before this one were not given)",
                    head.name,
                    seq - last - 1,
                    tail.name
                )
            })
        })
        .collect();
    for (chain, seam) in chains.iter().zip(seams) {
        let mut summary = ChainSummary {
            files: chain.iter().map(|f| f.name.clone()).collect(),
            first_seq: None,
            last_seq: None,
            from_genesis: false,
            status: seam.unwrap_or_else(|| "ok".to_string()),
        };
        // The seq and hash the next line must carry; `None` before the chain's first line.
        let mut expect: Option<(u64, String)> = None;
        'files: for file in chain {
            let read = |error| ReportError::Read {
                file: file.name.clone(),
                error,
            };
            let mut reader =
                BufReader::with_capacity(64 * 1024, File::open(&file.path).map_err(read)?);
            let mut number = 0u64;
            loop {
                let n = read_line(&mut reader, &mut buf).map_err(read)?;
                if n == 0 {
                    break;
                }
                number += 1;
                let broken = |why: &str| format!("broken at {} line {number}: {why}", file.name);
                if buf.pop() != Some(b'\n') {
                    summary.status = broken(if n > MAX_LINE_BYTES {
                        "a line longer than 16 MiB"
                    } else {
                        "the last line has no newline (a cut or partly written tail)"
                    });
                    break 'files;
                }
                let Ok(line) = serde_json::from_slice::<Line<'_>>(&buf) else {
                    summary.status = broken("not an audit record");
                    break 'files;
                };
                match &expect {
                    None => summary.from_genesis = line.seq == 1 && line.prev_sha256 == GENESIS,
                    Some((seq, sha)) => {
                        if line.seq != *seq {
                            summary.status =
                                broken(&format!("seq {} where {seq} was due", line.seq));
                            break 'files;
                        }
                        if line.prev_sha256 != sha.as_str() {
                            summary.status = broken(
                                "prev_sha256 is not the hash of the line before (it, or the line before, was changed)",
                            );
                            break 'files;
                        }
                    }
                }
                summary.first_seq.get_or_insert(line.seq);
                summary.last_seq = Some(line.seq);
                totals.add(&line, period);
                expect = Some((line.seq + 1, crate::hex(&crate::sha256(&buf))));
            }
        }
        summaries.push(summary);
    }
    let chain = summaries
        .iter()
        .find(|s| s.status != "ok")
        .map_or_else(|| "ok".to_string(), |s| s.status.clone());
    Ok(Report {
        records: totals.records,
        from: period.since.clone().or(totals.from),
        until: period.until.clone().or(totals.until),
        chain,
        rows: totals.rows.into_values().collect(),
        signatures: totals
            .signatures
            .into_iter()
            .map(|((client, kind, product_id), count)| Signatures {
                client,
                kind,
                product_id,
                count,
            })
            .collect(),
        markers: totals.markers,
        chains: summaries,
    })
}

/// `name:count;name:count`, for the text and CSV tables.
fn counts(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "-".to_string();
    }
    map.iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// The text tables.
pub fn write_text(r: &Report, out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "audit report: {} request record(s), {} .. {}; chain {}",
        r.records,
        r.from.as_deref().unwrap_or("-"),
        r.until.as_deref().unwrap_or("-"),
        r.chain
    )?;
    for c in &r.chains {
        writeln!(
            out,
            "  chain: seq {}..{} in {} ({}): {}",
            c.first_seq.map_or("-".into(), |s| s.to_string()),
            c.last_seq.map_or("-".into(), |s| s.to_string()),
            c.files.join(" "),
            if c.from_genesis {
                "from its start"
            } else {
                "continuing files not given"
            },
            c.status
        )?;
    }
    writeln!(out, "\nUSE (client x key x API)")?;
    writeln!(
        out,
        "  {:<18} {:<12} {:<20} {:>9}  {:<34} {:<24} {:<24} FIRST .. LAST",
        "CLIENT", "KEY", "API", "REQUESTS", "DECISIONS", "STATUSES", "APPLE 401/403 CAUSES"
    )?;
    for row in &r.rows {
        writeln!(
            out,
            "  {:<18} {:<12} {:<20} {:>9}  {:<34} {:<24} {:<24} {} .. {}",
            row.client,
            row.key,
            row.api,
            row.requests,
            counts(&row.by_decision),
            counts(&row.by_status),
            counts(&row.by_cause),
            row.first,
            row.last
        )?;
    }
    writeln!(out, "\nSIGNATURES (in-app, signed)")?;
    if r.signatures.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for s in &r.signatures {
        writeln!(
            out,
            "  {:<18} {:<32} {:<32} {:>7}",
            s.client, s.kind, s.product_id, s.count
        )?;
    }
    writeln!(
        out,
        "\nMARKERS: records_lost {}, resumed_after_truncation {}",
        r.markers.records_lost, r.markers.resumed_after_truncation
    )
}

/// The rows as CSV (RFC 4180 quoting).
pub fn write_csv(r: &Report, out: &mut impl Write) -> io::Result<()> {
    fn field(s: &str) -> Cow<'_, str> {
        if s.contains([',', '"', '\n', '\r']) {
            Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
        } else {
            Cow::Borrowed(s)
        }
    }
    writeln!(
        out,
        "client,key,api,requests,by_decision,by_status,by_cause,first,last"
    )?;
    for row in &r.rows {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            field(&row.client),
            field(&row.key),
            field(&row.api),
            row.requests,
            field(&counts(&row.by_decision)),
            field(&counts(&row.by_status)),
            field(&counts(&row.by_cause)),
            row.first,
            row.last
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, first: (u64, &str), last: (u64, &str)) -> Ends {
        Ends {
            path: PathBuf::from(name),
            name: name.to_string(),
            first: Some((first.0, first.1.to_string())),
            last: Some((last.0, last.1.to_string())),
        }
    }

    #[test]
    fn files_are_put_in_chain_order_and_replicas_kept_apart() {
        // Replica A: a.2 (1..10) → a.1 (11..20) → a (21..30); replica B: b (1..5).
        let files = vec![
            file("a", (21, "h20"), (30, "h30")),
            file("b", (1, GENESIS), (5, "b5")),
            file("a.2", (1, GENESIS), (10, "h10")),
            file("a.1", (11, "h10"), (20, "h20")),
        ];
        let names: Vec<Vec<String>> = chains(files)
            .into_iter()
            .map(|c| c.into_iter().map(|f| f.name).collect())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(
            names.contains(&vec!["a.2".into(), "a.1".into(), "a".into()]),
            "{names:?}"
        );
        assert!(names.contains(&vec!["b".into()]), "{names:?}");
        // A file whose link does not hold (its predecessor edited) starts its own chain.
        let files = vec![
            file("a.1", (11, "h10-edited"), (20, "h20")),
            file("a.2", (1, GENESIS), (10, "h10")),
        ];
        assert_eq!(chains(files).len(), 2);
    }

    #[test]
    fn a_period_includes_since_and_excludes_until() {
        let p = Period {
            since: Some("2026-11-01T00:00:00.000Z".into()),
            until: Some("2026-12-01T00:00:00.000Z".into()),
        };
        assert!(p.contains("2026-11-01T00:00:00.000Z"));
        assert!(p.contains("2026-11-30T23:59:59.999Z"));
        assert!(!p.contains("2026-12-01T00:00:00.000Z"));
        assert!(!p.contains("2026-10-31T23:59:59.999Z"));
        assert!(Period::default().contains("1970-01-01T00:00:00.000Z"));
    }
}
