//! Synthetic local data for the demo and the tests: three sites whose text is drawn from different
//! distributions (clinical notes, bank transfers, weather reports), deterministic for a seed.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The demo's sites, by name.
pub const SITE_NAMES: [&str; 3] = ["clinic", "bank", "weather"];

fn pick<'a>(rng: &mut StdRng, options: &[&'a str]) -> &'a str {
    options[rng.random_range(0..options.len())]
}

/// One document of site `site_index` (0 clinic, 1 bank, 2 weather; wraps around).
pub fn document(site_index: usize, rng: &mut StdRng) -> String {
    match site_index % 3 {
        0 => format!(
            "Patient {} ({} y) presented with {} and {}. Prescribed {} {} mg twice daily; review in {} days.",
            pick(rng, &["A.K.", "M.R.", "J.S.", "L.T.", "E.W.", "P.N."]),
            rng.random_range(18..95),
            pick(
                rng,
                &[
                    "fever",
                    "cough",
                    "headache",
                    "chest pain",
                    "fatigue",
                    "nausea"
                ]
            ),
            pick(
                rng,
                &[
                    "dizziness",
                    "a rash",
                    "back pain",
                    "shortness of breath",
                    "chills"
                ]
            ),
            pick(
                rng,
                &[
                    "amoxicillin",
                    "ibuprofen",
                    "metformin",
                    "lisinopril",
                    "paracetamol"
                ]
            ),
            pick(rng, &["250", "500", "100", "20", "850"]),
            rng.random_range(3..30),
        ),
        1 => format!(
            "Transfer of {}.{:02} EUR from account DE{:02} {} to {} on 2026-{:02}-{:02}: {}.",
            rng.random_range(5..9000),
            rng.random_range(0..100),
            rng.random_range(10..99),
            rng.random_range(1000..9999),
            pick(
                rng,
                &[
                    "Acme GmbH",
                    "City Utilities",
                    "Rent Co",
                    "Grocer Ltd",
                    "Telecom AG"
                ]
            ),
            rng.random_range(1..13),
            rng.random_range(1..29),
            pick(
                rng,
                &["settled", "pending", "flagged for review", "reversed"]
            ),
        ),
        _ => format!(
            "{}: {} with a high of {} C and winds from the {} at {} km/h. Tomorrow {}.",
            pick(rng, &["Oslo", "Lyon", "Porto", "Graz", "Turku", "Bergen"]),
            pick(
                rng,
                &[
                    "light rain",
                    "sunshine",
                    "overcast skies",
                    "snow showers",
                    "fog"
                ]
            ),
            rng.random_range(-10..35),
            pick(rng, &["north", "south-west", "east", "north-east", "west"]),
            rng.random_range(2..60),
            pick(
                rng,
                &["clearing", "more of the same", "storms likely", "colder"]
            ),
        ),
    }
}

/// Writes `documents` lines of `{"text": ...}` for site `site_index` to `path`.
pub fn write_site_jsonl(
    path: &Path,
    site_index: usize,
    documents: usize,
    seed: u64,
) -> std::io::Result<()> {
    let mut rng =
        StdRng::seed_from_u64(seed ^ (site_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut out = String::new();
    for _ in 0..documents {
        out.push_str(&serde_json::json!({ "text": document(site_index, &mut rng) }).to_string());
        out.push('\n');
    }
    std::fs::write(path, out)
}
