//! The history checker: what a run proves or disproves about Kinesin's
//! promises. Safety: nothing acknowledged is lost, a failed put never
//! becomes visible, one value per sequence number, one order per shard for
//! every reader, replicas agree. Liveness: every shard answers after heal,
//! no node panicked.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::{json, Value};

use crate::history::{Event, Kind};

const MAX_EXAMPLES: usize = 32;

#[derive(Debug, Default, Serialize)]
pub struct Class {
    pub count: u64,
    pub examples: Vec<Value>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub valid: bool,
    /// Safety or liveness violations.
    pub errors: BTreeMap<String, Class>,
    /// Expected under faults, not violations (unknown-outcome puts never
    /// seen, duplicates of retried puts).
    pub notes: BTreeMap<String, Class>,
    pub counts: BTreeMap<String, u64>,
}

impl Report {
    fn add(map: &mut BTreeMap<String, Class>, name: &str, example: Value) {
        let class = map.entry(name.to_string()).or_default();
        class.count += 1;
        if class.examples.len() < MAX_EXAMPLES {
            class.examples.push(example);
        }
    }

    pub(crate) fn error(&mut self, name: &str, example: Value) {
        Self::add(&mut self.errors, name, example);
    }

    pub(crate) fn note(&mut self, name: &str, example: Value) {
        Self::add(&mut self.notes, name, example);
    }

    pub(crate) fn count(&mut self, name: &str, n: u64) {
        *self.counts.entry(name.to_string()).or_default() += n;
    }
}

/// (sequence number, value) pairs in shard order.
pub type Records = Vec<(String, String)>;

/// Each replica's records per group, in order.
pub type Replicas = BTreeMap<u32, BTreeMap<u64, Records>>;

#[derive(Default)]
struct PutOutcomes {
    invokes: u32,
    oks: Vec<(String, String)>,
    fails: u32,
    infos: u32,
}

fn seq_num(s: &str) -> Option<u128> {
    s.parse().ok()
}

pub fn check(history: &[Event], replicas: &Replicas, panics: &[String]) -> Report {
    let mut r = Report::default();
    let mut puts: HashMap<&str, PutOutcomes> = HashMap::new();
    // (shard, seq) -> values claimed for it by acks and reads.
    let mut at_seq: BTreeMap<(&str, String), BTreeSet<&str>> = BTreeMap::new();
    // (reader process, shard) -> the records it read, in order.
    let mut chains: BTreeMap<(&str, &str), Vec<(String, String)>> = BTreeMap::new();
    // shard -> (reading process, records) of every final read.
    let mut finals: BTreeMap<&str, Vec<(&str, &Records)>> = BTreeMap::new();

    for e in history {
        match (e.op.as_str(), e.kind) {
            ("put", kind) => {
                let Some(v) = e.value.as_deref() else {
                    continue;
                };
                let p = puts.entry(v).or_default();
                match kind {
                    Kind::Invoke => p.invokes += 1,
                    Kind::Ok => {
                        let shard = e.shard.clone().unwrap_or_default();
                        let seq = e.seq.clone().unwrap_or_default();
                        p.oks.push((shard, seq));
                    }
                    Kind::Fail => p.fails += 1,
                    Kind::Info => p.infos += 1,
                }
                if kind == Kind::Ok {
                    if let (Some(shard), Some(seq)) = (e.shard.as_deref(), e.seq.as_ref()) {
                        at_seq.entry((shard, seq.clone())).or_default().insert(v);
                    }
                }
            }
            ("read", Kind::Ok) => {
                let shard = e.shard.as_deref().unwrap_or_default();
                for (seq, value) in &e.records {
                    at_seq
                        .entry((shard, seq.clone()))
                        .or_default()
                        .insert(value.as_str());
                }
                chains
                    .entry((e.process.as_str(), shard))
                    .or_default()
                    .extend(e.records.iter().cloned());
                r.count("read-records", e.records.len() as u64);
            }
            ("final-read", Kind::Ok) => {
                let shard = e.shard.as_deref().unwrap_or_default();
                finals
                    .entry(shard)
                    .or_default()
                    .push((e.process.as_str(), &e.records));
            }
            ("final-read", Kind::Fail) | ("final-read", Kind::Info) => r.error(
                "final-read-failed",
                json!({"process": e.process, "shard": e.shard, "error": e.error}),
            ),
            ("liveness", Kind::Fail) => r.error(
                "no-leader-after-heal",
                json!({"shard": e.shard, "node": e.node, "error": e.error}),
            ),
            ("fault", Kind::Invoke) => r.count("faults", 1),
            ("degraded-op", Kind::Fail) => r.error(
                "degraded-operation-failed",
                json!({"step": e.value, "via": e.node, "error": e.error}),
            ),
            ("membership", Kind::Fail) => r.error(
                "membership-change-failed",
                json!({"change": e.value, "error": e.error}),
            ),
            _ => {}
        }
    }

    // The canonical order of each shard: the first final read. Every other
    // final read (through another node) must be identical.
    let mut order: BTreeMap<&str, &Records> = BTreeMap::new();
    for (shard, reads) in &finals {
        let (first_process, first) = reads[0];
        for (process, other) in &reads[1..] {
            if other != &first {
                let at = first.iter().zip(other.iter()).position(|(a, b)| a != b);
                r.error(
                    "final-reads-disagree",
                    json!({"shard": shard, "readers": [first_process, process], "first_difference": at,
                        "lengths": [first.len(), other.len()]}),
                );
            }
        }
        order.insert(shard, first);
    }

    // Where every value ended up.
    let mut found: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
    for (shard, records) in &order {
        r.count("final-records", records.len() as u64);
        let mut last: Option<u128> = None;
        for (seq, value) in records.iter() {
            found
                .entry(value.as_str())
                .or_default()
                .push((shard, seq.as_str()));
            at_seq
                .entry((shard, seq.clone()))
                .or_default()
                .insert(value.as_str());
            let n = seq_num(seq);
            if n.is_none() || n <= last {
                r.error(
                    "non-monotonic-final-read",
                    json!({"shard": shard, "seq": seq, "previous": last.map(|l| l.to_string())}),
                );
            }
            last = n;
        }
    }

    for ((shard, seq), values) in &at_seq {
        if values.len() > 1 {
            r.error(
                "two-values-at-one-sequence-number",
                json!({"shard": shard, "seq": seq, "values": values}),
            );
        }
    }

    let mut counts = (0, 0, 0, 0);
    for (value, p) in &puts {
        let seen = found.get(value).map(Vec::as_slice).unwrap_or_default();
        counts.0 += 1;
        if !p.oks.is_empty() {
            counts.1 += 1;
            if seen.is_empty() {
                r.error("lost", json!({"value": value, "acked_at": p.oks}));
            }
            for (shard, seq) in &p.oks {
                if !seen.is_empty() && !seen.iter().any(|(s, q)| s == shard && q == seq) {
                    r.error(
                        "acked-position-differs",
                        json!({"value": value, "acked": [shard, seq], "found": seen}),
                    );
                }
            }
        } else if p.infos > 0 {
            counts.3 += 1;
            if seen.is_empty() {
                r.note("unseen-unknown-outcome", json!({"value": value}));
            }
        } else if p.fails > 0 {
            counts.2 += 1;
            if !seen.is_empty() {
                r.error("failed-put-visible", json!({"value": value, "found": seen}));
            }
        }
        if seen.len() > p.invokes as usize {
            r.error(
                "duplicate",
                json!({"value": value, "found": seen, "attempts": p.invokes}),
            );
        } else if seen.len() > 1 {
            if p.invokes > 1 {
                r.note(
                    "duplicate-of-retried-put",
                    json!({"value": value, "found": seen, "attempts": p.invokes}),
                );
            } else {
                r.error("duplicate", json!({"value": value, "found": seen}));
            }
        }
    }
    r.count("values", counts.0);
    r.count("values-acked", counts.1);
    r.count("values-failed", counts.2);
    r.count("values-unknown", counts.3);
    for (value, places) in &found {
        if !puts.contains_key(value) {
            r.error("unexpected-value", json!({"value": value, "found": places}));
        }
    }

    // Every reader's chain on a shard is the shard's order from the start:
    // no gaps, no reordering, no repeats.
    for ((process, shard), chain) in &chains {
        let Some(canonical) = order.get(shard) else {
            continue;
        };
        if let Some(i) = (0..chain.len()).find(|&i| canonical.get(i) != Some(&chain[i])) {
            r.error(
                "reader-order-differs",
                json!({"process": process, "shard": shard, "index": i, "read": chain[i],
                    "expected": canonical.get(i)}),
            );
        }
    }

    // Replicas of one group hold the same records (one may lag: a prefix).
    let mut groups: BTreeMap<u64, Vec<(u32, &Records)>> = BTreeMap::new();
    for (node, dump) in replicas {
        for (group, records) in dump {
            groups.entry(*group).or_default().push((*node, records));
        }
    }
    for (group, copies) in &groups {
        for (k, (na, a)) in copies.iter().enumerate() {
            for (nb, b) in &copies[k + 1..] {
                if let Some(i) = a.iter().zip(b.iter()).position(|(x, y)| x != y) {
                    r.error(
                        "replicas-diverge",
                        json!({"group": group, "nodes": [na, nb], "index": i, "records": [a[i], b[i]]}),
                    );
                }
            }
        }
    }

    check_degraded(history, &mut r);
    for line in panics {
        r.error("panic", json!({"log": line}));
    }
    // A run that wrote, read or checked nothing proves nothing.
    for (count, what) in [
        ("values-acked", "no put was acknowledged"),
        ("read-records", "no reader saw a record"),
        ("final-records", "the final read found no record"),
    ] {
        if r.counts.get(count).copied().unwrap_or(0) == 0 {
            r.error("empty-run", json!({"reason": what}));
        }
    }
    crate::sqs::check(history, &mut r);
    r.valid = r.errors.is_empty();
    r
}

/// The longest a partition key may go without an acknowledged put while
/// one node is down and every group keeps a live majority (a failover
/// takes under 3 s at p99; twice that allows for a loaded machine).
pub const LIVENESS_GAP_MS: u64 = 6_000;

/// Liveness while degraded: between the nemesis' `degraded` invoke (a node
/// killed) and its ok (before heal), every partition key the producers use
/// takes an acknowledged put at least every `LIVENESS_GAP_MS` (the steps
/// of the nemesis' own work are checked with the other events).
fn check_degraded(history: &[Event], r: &mut Report) {
    let mut windows = Vec::new();
    let mut open = None;
    let mut acks: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in history {
        match (e.op.as_str(), e.kind) {
            ("degraded", Kind::Invoke) => open = Some(e.time_ms),
            ("degraded", Kind::Ok) => {
                if let Some(start) = open.take() {
                    windows.push((start, e.time_ms));
                }
            }
            ("put", Kind::Ok) => {
                if let Some(key) = e.key.as_deref() {
                    acks.entry(key).or_default().push(e.time_ms);
                }
            }
            _ => {}
        }
    }
    if windows.is_empty() {
        return;
    }
    r.count("degraded-windows", windows.len() as u64);
    let mut longest = 0;
    for &(start, end) in &windows {
        for (key, times) in &acks {
            let mut last = start;
            let inside = times.iter().copied().filter(|t| (start..=end).contains(t));
            for t in inside.chain(std::iter::once(end)) {
                let gap = t - last;
                longest = longest.max(gap);
                if gap > LIVENESS_GAP_MS {
                    r.error(
                        "no-write-accepted",
                        json!({"key": key, "from_ms": last, "to_ms": t, "gap_ms": gap,
                            "window_ms": [start, end]}),
                    );
                }
                last = t;
            }
        }
    }
    r.count("degraded-longest-gap-ms", longest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(kind: Kind, value: &str, at: Option<(&str, &str)>) -> Event {
        let mut e = Event::new("p0", kind, "put").value(value);
        if let Some((shard, seq)) = at {
            e = e.shard(shard).seq(seq);
        }
        e
    }

    fn acked(value: &str, shard: &str, seq: &str) -> Vec<Event> {
        vec![
            put(Kind::Invoke, value, None),
            put(Kind::Ok, value, Some((shard, seq))),
        ]
    }

    fn final_read(process: &str, shard: &str, records: &[(&str, &str)]) -> Event {
        Event::new(process, Kind::Ok, "final-read")
            .shard(shard)
            .records(
                records
                    .iter()
                    .map(|(s, v)| (s.to_string(), v.to_string()))
                    .collect(),
            )
    }

    /// Violations other than `empty-run` (most tests have no readers).
    fn errors(history: &[Event]) -> Vec<String> {
        check(history, &Replicas::new(), &[])
            .errors
            .into_keys()
            .filter(|k| k != "empty-run")
            .collect()
    }

    fn safety_valid(report: &Report) -> bool {
        report.errors.keys().all(|k| k == "empty-run")
    }

    #[test]
    fn a_clean_history_is_valid() {
        let mut h = acked("a", "s0", "10");
        h.extend(acked("b", "s0", "11"));
        h.push(put(Kind::Invoke, "c", None));
        h.push(put(Kind::Info, "c", None));
        h.push(
            Event::new("r1", Kind::Ok, "read")
                .shard("s0")
                .records(vec![("10".into(), "a".into())]),
        );
        h.push(final_read("final-n1", "s0", &[("10", "a"), ("11", "b")]));
        h.push(final_read("final-n2", "s0", &[("10", "a"), ("11", "b")]));
        let report = check(&h, &Replicas::new(), &[]);
        assert!(report.valid, "{:?}", report.errors);
        assert_eq!(report.notes["unseen-unknown-outcome"].count, 1);
        // The same history without its reader proves less: not valid.
        let no_reader: Vec<Event> = h.into_iter().filter(|e| e.op != "read").collect();
        let report = check(&no_reader, &Replicas::new(), &[]);
        assert_eq!(report.errors.keys().collect::<Vec<_>>(), ["empty-run"]);
        assert_eq!(report.counts["values-acked"], 2);
    }

    #[test]
    fn an_acknowledged_value_missing_after_heal_is_lost() {
        let mut h = acked("a", "s0", "10");
        h.extend(acked("b", "s0", "11"));
        h.push(final_read("final-n1", "s0", &[("10", "a")]));
        assert_eq!(errors(&h), ["lost"]);
    }

    #[test]
    fn a_failed_put_must_not_become_visible() {
        let h = vec![
            put(Kind::Invoke, "a", None),
            put(Kind::Fail, "a", None),
            final_read("final-n1", "s0", &[("10", "a")]),
        ];
        assert_eq!(errors(&h), ["failed-put-visible"]);
    }

    #[test]
    fn duplicates_are_errors_unless_the_put_was_retried() {
        let mut h = acked("a", "s0", "10");
        h.push(final_read("final-n1", "s0", &[("10", "a"), ("11", "a")]));
        assert_eq!(errors(&h), ["duplicate"]);

        let mut h = vec![put(Kind::Invoke, "a", None), put(Kind::Info, "a", None)];
        h.extend(acked("a", "s0", "11"));
        h.push(final_read("final-n1", "s0", &[("10", "a"), ("11", "a")]));
        let report = check(&h, &Replicas::new(), &[]);
        assert!(safety_valid(&report), "{:?}", report.errors);
        assert_eq!(report.notes["duplicate-of-retried-put"].count, 1);
        // Two attempts explain two copies, not three.
        let mut three = h.clone();
        three.pop();
        three.push(final_read(
            "final-n1",
            "s0",
            &[("10", "a"), ("11", "a"), ("12", "a")],
        ));
        assert_eq!(errors(&three), ["duplicate"]);
    }

    #[test]
    fn two_values_at_one_sequence_number() {
        let mut h = acked("a", "s0", "10");
        h.extend(acked("b", "s0", "10"));
        h.push(final_read("final-n1", "s0", &[("10", "a"), ("11", "b")]));
        let e = errors(&h);
        assert!(
            e.contains(&"two-values-at-one-sequence-number".to_string()),
            "{e:?}"
        );
        assert!(e.contains(&"acked-position-differs".to_string()), "{e:?}");
    }

    #[test]
    fn readers_must_see_the_shard_order_without_gaps() {
        let mut h = acked("a", "s0", "10");
        h.extend(acked("b", "s0", "11"));
        h.push(
            Event::new("r1", Kind::Ok, "read")
                .shard("s0")
                .records(vec![("11".into(), "b".into())]),
        );
        h.push(final_read("final-n1", "s0", &[("10", "a"), ("11", "b")]));
        assert_eq!(errors(&h), ["reader-order-differs"]);
    }

    #[test]
    fn final_reads_through_different_nodes_must_agree() {
        let mut h = acked("a", "s0", "10");
        h.push(final_read("final-n1", "s0", &[("10", "a")]));
        h.push(final_read("final-n2", "s0", &[]));
        assert_eq!(errors(&h), ["final-reads-disagree"]);
    }

    #[test]
    fn diverging_replicas_are_reported_but_a_lagging_one_is_not() {
        let records = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(s, d)| (s.to_string(), d.to_string()))
                .collect()
        };
        let mut replicas = Replicas::new();
        replicas.insert(1, BTreeMap::from([(7, records(&[("1", "a"), ("2", "b")]))]));
        replicas.insert(2, BTreeMap::from([(7, records(&[("1", "a")]))]));
        assert!(safety_valid(&check(&[], &replicas, &[])));
        // A lagging replica between two diverging ones hides nothing.
        replicas.insert(3, BTreeMap::from([(7, records(&[("1", "a"), ("2", "x")]))]));
        let report = check(&[], &replicas, &[]);
        assert_eq!(report.errors["replicas-diverge"].count, 1);
    }

    #[test]
    fn unknown_values_and_panics_are_errors() {
        let h = vec![final_read("final-n1", "s0", &[("10", "zz")])];
        assert_eq!(errors(&h), ["unexpected-value"]);
        let report = check(&[], &Replicas::new(), &["thread panicked at x".into()]);
        assert!(!report.valid);
    }

    fn at(mut e: Event, ms: u64) -> Event {
        e.time_ms = ms;
        e
    }

    /// Acked puts of `key` at the given times, each with its final read.
    fn acks_of(key: &str, times: &[u64], h: &mut Vec<Event>) -> Vec<(String, String)> {
        let mut read = Vec::new();
        for t in times {
            let value = format!("{key}-{t}");
            let seq = format!("{:08}", 1_000 + t);
            h.push(at(put(Kind::Invoke, &value, None), *t));
            h.push(at(put(Kind::Ok, &value, Some(("s0", &seq))).key(key), *t));
            read.push((seq, value));
        }
        read
    }

    fn degraded_history(k1: &[u64], k2: &[u64]) -> Vec<Event> {
        let mut h = vec![at(
            Event::new("nemesis", Kind::Invoke, "degraded").node(1),
            0,
        )];
        let mut read = acks_of("k1", k1, &mut h);
        read.extend(acks_of("k2", k2, &mut h));
        read.sort();
        h.push(at(
            Event::new("nemesis", Kind::Ok, "degraded").node(1),
            10_000,
        ));
        h.push(
            Event::new("final-n2", Kind::Ok, "final-read")
                .shard("s0")
                .records(read),
        );
        h
    }

    #[test]
    fn every_key_must_take_writes_while_one_node_is_down() {
        let h = degraded_history(&[1_000, 5_000, 9_000], &[2_000, 7_000]);
        let report = check(&h, &Replicas::new(), &[]);
        assert!(safety_valid(&report), "{:?}", report.errors);
        assert_eq!(report.counts["degraded-longest-gap-ms"], 5_000);
        // k2 silent from 2 s to the window's end at 10 s.
        let h = degraded_history(&[1_000, 5_000, 9_000], &[2_000]);
        assert_eq!(errors(&h), ["no-write-accepted"]);
        // k1 silent from the kill until 6.5 s.
        let h = degraded_history(&[6_500, 9_000], &[2_000, 7_000]);
        assert_eq!(errors(&h), ["no-write-accepted"]);
    }

    #[test]
    fn a_failed_step_of_the_degraded_work_is_an_error() {
        let mut h = degraded_history(&[1_000, 5_000, 9_000], &[2_000, 7_000]);
        h.push(
            Event::new("nemesis", Kind::Fail, "degraded-op")
                .value("reshard")
                .error("HTTP 503 ServiceUnavailable"),
        );
        assert_eq!(errors(&h), ["degraded-operation-failed"]);
    }
}
