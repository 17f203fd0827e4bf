//! What zstd would save and cost on realistic server messages, and training sets for a
//! dictionary. A message here is what the server writes: one `ServerMessage` envelope holding
//! a batch of `Update` frames whose payloads are generated ROUTE or POI JSON.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use routopia_realtime::protocol::envelope;
use routopia_realtime::protocol::pb;
use serde_json::{json, Value};

use crate::payloads::{Generator, Kind};

#[derive(clap::Args, Debug, Clone)]
pub struct ZstdTableArgs {
    /// Payload kinds to measure.
    #[arg(long, value_delimiter = ',', value_parser = crate::parse_kind, default_value = "route,poi")]
    pub kinds: Vec<Kind>,
    /// Updates per message (the server's batches).
    #[arg(long, value_delimiter = ',', default_value = "1,5,20")]
    pub batches: Vec<usize>,
    /// Compression thresholds (bytes): messages smaller than this stay plain.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024,4096")]
    pub thresholds: Vec<usize>,
    /// Messages measured per kind and batch size.
    #[arg(long, default_value_t = 100)]
    pub messages: usize,
    /// Payloads the dictionary is trained on (generated from another seed than the messages).
    #[arg(long, default_value_t = 1000)]
    pub train_samples: usize,
    /// Largest dictionary, bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    pub dict_size: usize,
    /// Seed of the measured messages (training uses seed + 1,000,000).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    pub json: bool,
}

/// Writes `count` payloads of `kind`, one per file, to `dir`.
pub fn write_samples(kind: Kind, count: usize, dir: &Path, seed: u64) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    let mut generator = Generator::new(seed);
    let mut bytes = 0;
    for i in 0..count {
        let sample = generator.next(kind);
        bytes += sample.len();
        let path = dir.join(format!("{}-{i:06}.json", kind.name()));
        std::fs::write(&path, sample).map_err(|err| format!("{}: {err}", path.display()))?;
    }
    eprintln!(
        "wrote {count} {} samples ({} bytes, {:.0} per sample) to {}",
        kind.name(),
        bytes,
        bytes as f64 / count.max(1) as f64,
        dir.display()
    );
    Ok(())
}

/// The encoded envelope of one batch of updates carrying `payloads`.
fn message(payloads: &[Vec<u8>], first_offset: u64) -> Vec<u8> {
    let frames = payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| pb::ServerFrame {
            kind: Some(pb::server_frame::Kind::Update(pb::Update {
                sub_id: 1,
                offset: first_offset + i as u64,
                r#type: pb::UpdateType::Route as i32,
                key: String::new(),
                confidence: 1.0,
                timestamp_us: 1_795_000_000_000_000 + first_offset * 1000,
                payload: payload.clone().into(),
                skipped: 0,
            })),
        })
        .collect();
    envelope::encode::<pb::ServerMessage>(frames, None)
}

/// Size after compression and CPU µs to compress and decompress one message, one setting.
#[derive(Clone, Copy, Default)]
struct Cost {
    bytes: usize,
    compress_us: f64,
    decompress_us: f64,
}

/// Measures one message with one compressor. Each step runs `REPEAT` times after a warm-up
/// and the fastest counts: on a shared machine the slower runs measure the neighbours.
fn measure(
    plain: &[u8],
    compressor: &mut zstd::bulk::Compressor<'_>,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
) -> Result<Cost, String> {
    const REPEAT: usize = 7;
    let mut packed = compressor.compress(plain).map_err(|err| format!("zstd compress: {err}"))?;
    let mut compress_us = f64::INFINITY;
    for _ in 0..REPEAT {
        let began = Instant::now();
        packed = compressor.compress(plain).map_err(|err| format!("zstd compress: {err}"))?;
        compress_us = compress_us.min(began.elapsed().as_secs_f64() * 1e6);
    }
    let mut decompress_us = f64::INFINITY;
    for _ in 0..=REPEAT {
        let began = Instant::now();
        let unpacked =
            decompressor.decompress(&packed, plain.len()).map_err(|err| format!("zstd decompress: {err}"))?;
        decompress_us = decompress_us.min(began.elapsed().as_secs_f64() * 1e6);
        if unpacked != plain {
            return Err("zstd round trip changed the message".into());
        }
    }
    Ok(Cost { bytes: packed.len(), compress_us, decompress_us })
}

/// The settings every message is measured with, in column order.
const SETTINGS: [(&str, i32, bool); 4] =
    [("L1", 1, false), ("L3", 3, false), ("dict L1", 1, true), ("dict L3", 3, true)];

struct Measured {
    kind: Kind,
    batch: usize,
    plain: Vec<usize>,
    /// Per setting, per message.
    costs: Vec<Vec<Cost>>,
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

fn saving(before: f64, after: f64) -> f64 {
    if before > 0.0 {
        100.0 * (1.0 - after / before)
    } else {
        0.0
    }
}

pub fn run(args: &ZstdTableArgs) -> Result<(), String> {
    if args.kinds.is_empty() || args.batches.is_empty() || args.batches.contains(&0) || args.messages == 0 {
        return Err("--kinds, --batches (each ≥ 1) and --messages must not be empty or zero".into());
    }
    let mut measured = Vec::new();
    let mut dictionaries = Vec::new();
    for &kind in &args.kinds {
        // The dictionary learns from other payloads than the ones measured, as it would in
        // production (trained on yesterday's traffic).
        let mut trainer = Generator::new(args.seed.wrapping_add(1_000_000));
        let training: Vec<Vec<u8>> = (0..args.train_samples).map(|_| trainer.next(kind)).collect();
        let began = Instant::now();
        let dict = zstd::dict::from_samples(&training, args.dict_size)
            .map_err(|err| format!("training a {} dictionary: {err}", kind.name()))?;
        dictionaries.push((kind, dict.len(), began.elapsed().as_secs_f64()));
        let mut compressors = Vec::new();
        let mut decompressors = Vec::new();
        for (_, level, with_dict) in SETTINGS {
            let (c, d) = if with_dict {
                (
                    zstd::bulk::Compressor::with_dictionary(level, &dict),
                    zstd::bulk::Decompressor::with_dictionary(&dict),
                )
            } else {
                (zstd::bulk::Compressor::new(level), zstd::bulk::Decompressor::new())
            };
            compressors.push(c.map_err(|err| format!("zstd: {err}"))?);
            decompressors.push(d.map_err(|err| format!("zstd: {err}"))?);
        }
        let mut generator = Generator::new(args.seed);
        for &batch in &args.batches {
            let mut plain = Vec::with_capacity(args.messages);
            let mut costs = vec![Vec::with_capacity(args.messages); SETTINGS.len()];
            for m in 0..args.messages {
                let payloads: Vec<Vec<u8>> = (0..batch).map(|_| generator.next(kind)).collect();
                let bytes = message(&payloads, (m * batch) as u64 + 1);
                plain.push(bytes.len());
                for (s, cost) in costs.iter_mut().enumerate() {
                    cost.push(measure(&bytes, &mut compressors[s], &mut decompressors[s])?);
                }
            }
            measured.push(Measured { kind, batch, plain, costs });
        }
    }

    // Per batch size: means over the messages.
    let mut by_batch = Vec::new();
    for m in &measured {
        let plain = mean(m.plain.iter().map(|&b| b as f64));
        let settings: Vec<Value> = SETTINGS
            .iter()
            .zip(&m.costs)
            .map(|((name, level, dict), costs)| {
                let after = mean(costs.iter().map(|c| c.bytes as f64));
                json!({
                    "setting": name, "level": level, "dictionary": dict,
                    "bytes_after": after, "saving_pct": saving(plain, after),
                    "compress_us": mean(costs.iter().map(|c| c.compress_us)),
                    "decompress_us": mean(costs.iter().map(|c| c.decompress_us)),
                })
            })
            .collect();
        by_batch
            .push(json!({ "kind": m.kind.name(), "updates": m.batch, "bytes_before": plain, "settings": settings }));
    }
    // Per threshold: a mix of every batch size; messages below the threshold stay plain.
    let mut by_threshold = Vec::new();
    for &kind in &args.kinds {
        let rows: Vec<&Measured> = measured.iter().filter(|m| m.kind == kind).collect();
        let total = rows.iter().map(|m| m.plain.len()).sum::<usize>().max(1);
        let before: usize = rows.iter().flat_map(|m| m.plain.iter()).sum();
        for &threshold in &args.thresholds {
            let settings: Vec<Value> = SETTINGS
                .iter()
                .enumerate()
                .map(|(s, (name, level, dict))| {
                    let (mut after, mut compressed, mut cpu, mut dcpu) = (0usize, 0usize, 0.0, 0.0);
                    for m in &rows {
                        for (i, &plain) in m.plain.iter().enumerate() {
                            if plain >= threshold {
                                let cost = m.costs[s][i];
                                after += cost.bytes;
                                compressed += 1;
                                cpu += cost.compress_us;
                                dcpu += cost.decompress_us;
                            } else {
                                after += plain;
                            }
                        }
                    }
                    json!({
                        "setting": name, "level": level, "dictionary": dict,
                        "compressed_pct": 100.0 * compressed as f64 / total as f64,
                        "bytes_after": after, "saving_pct": saving(before as f64, after as f64),
                        "compress_us_per_message": cpu / total as f64,
                        "decompress_us_per_message": dcpu / total as f64,
                    })
                })
                .collect();
            by_threshold.push(json!({
                "kind": kind.name(), "threshold": threshold, "messages": total,
                "bytes_before": before, "settings": settings,
            }));
        }
    }
    let dicts: Vec<Value> = dictionaries
        .iter()
        .map(|(kind, size, secs)| json!({ "kind": kind.name(), "bytes": size, "train_s": secs }))
        .collect();
    let report = json!({
        "batches": args.batches, "thresholds": args.thresholds, "messages_per_cell": args.messages,
        "train_samples": args.train_samples, "dictionaries": dicts,
        "by_batch": by_batch, "by_threshold": by_threshold,
    });
    if args.json {
        println!("{report}");
    } else {
        print!("{}", to_text(&report));
    }
    Ok(())
}

fn f(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(
                |(c, cell)| {
                    if c == 0 {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                },
            )
            .collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            let _ = writeln!(out, "| {} |", rule.join(" | "));
        }
    }
    out
}

fn to_text(report: &Value) -> String {
    let mut out = String::new();
    let empty = Vec::new();
    let list = |key: &str| report.get(key).and_then(Value::as_array).unwrap_or(&empty).clone();
    let _ = writeln!(
        out,
        "zstd on realistic messages ({} messages per cell; dictionaries trained on {} other payloads: {})",
        report["messages_per_cell"],
        report["train_samples"],
        list("dictionaries")
            .iter()
            .map(|d| format!("{} {} B in {:.2} s", d["kind"].as_str().unwrap_or("?"), d["bytes"], f(d, "train_s")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(out, "\nPer message (means): bytes after, saving, CPU µs to compress / decompress one message");
    let mut rows = vec![vec!["kind".to_string(), "updates".into(), "bytes before".into()]];
    for (name, _, _) in SETTINGS {
        rows[0].extend([format!("{name} bytes"), format!("{name} save %"), format!("{name} µs c/d")]);
    }
    for row in list("by_batch") {
        let mut cells = vec![
            row["kind"].as_str().unwrap_or("?").to_string(),
            row["updates"].to_string(),
            format!("{:.0}", f(&row, "bytes_before")),
        ];
        for s in row["settings"].as_array().unwrap_or(&empty) {
            cells.push(format!("{:.0}", f(s, "bytes_after")));
            cells.push(format!("{:.1}", f(s, "saving_pct")));
            cells.push(format!("{:.1} / {:.1}", f(s, "compress_us"), f(s, "decompress_us")));
        }
        rows.push(cells);
    }
    out.push_str(&table(&rows));
    let _ = writeln!(
        out,
        "\nPer threshold, over an even mix of the batch sizes (smaller messages stay plain): share compressed, \
         total saving, CPU µs per message (all messages counted)"
    );
    let mut rows = vec![vec!["kind".to_string(), "threshold B".into(), "bytes before".into()]];
    for (name, _, _) in SETTINGS {
        rows[0].extend([format!("{name} compressed %"), format!("{name} save %"), format!("{name} µs c/d")]);
    }
    for row in list("by_threshold") {
        let mut cells = vec![
            row["kind"].as_str().unwrap_or("?").to_string(),
            row["threshold"].to_string(),
            row["bytes_before"].to_string(),
        ];
        for s in row["settings"].as_array().unwrap_or(&empty) {
            cells.push(format!("{:.0}", f(s, "compressed_pct")));
            cells.push(format!("{:.1}", f(s, "saving_pct")));
            cells.push(format!("{:.1} / {:.1}", f(s, "compress_us_per_message"), f(s, "decompress_us_per_message")));
        }
        rows.push(cells);
    }
    out.push_str(&table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_decodes_back_to_its_updates() {
        let mut generator = Generator::new(5);
        let payloads: Vec<Vec<u8>> = (0..3).map(|_| generator.next(Kind::Poi)).collect();
        let bytes = message(&payloads, 10);
        let frames = envelope::decode::<pb::ServerMessage>(&bytes[..], 1 << 20, &Default::default()).unwrap();
        assert_eq!(frames.len(), 3);
        match &frames[2].kind {
            Some(pb::server_frame::Kind::Update(u)) => {
                assert_eq!(u.offset, 12);
                assert_eq!(&u.payload[..], &payloads[2][..]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn samples_are_one_per_file() {
        let dir = std::env::temp_dir().join(format!("routopia-samples-test-{}", std::process::id()));
        write_samples(Kind::Route, 3, &dir, 9).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        assert_eq!(names.len(), 3);
        let first: Value = serde_json::from_slice(&std::fs::read(&names[0]).unwrap()).unwrap();
        assert!(first["route_id"].is_string());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
