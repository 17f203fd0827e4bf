//! Plausible navigation payloads as JSON bytes: routes, points of interest, weather, traffic
//! and incident alerts, the way Routopia's backends publish them. Deterministic from a seed,
//! so that runs, dictionary training sets and benchmarks see the same bytes.
//!
//! Self-contained (std, rand, serde_json only) so that benches can include it with `#[path]`.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};

/// What a payload describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Route,
    Poi,
    Weather,
    Traffic,
    Incident,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Route, Kind::Poi, Kind::Weather, Kind::Traffic, Kind::Incident];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Route => "route",
            Kind::Poi => "poi",
            Kind::Weather => "weather",
            Kind::Traffic => "traffic",
            Kind::Incident => "incident",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown payload kind '{s}' (route, poi, weather, traffic, incident)"))
    }
}

struct City {
    name: &'static str,
    lat: f64,
    lon: f64,
    streets: &'static [&'static str],
    postcodes: &'static [&'static str],
}

const CITIES: &[City] = &[
    City {
        name: "Paris",
        lat: 48.8566,
        lon: 2.3522,
        streets: &[
            "Rue de Rivoli",
            "Boulevard Haussmann",
            "Avenue des Champs-Élysées",
            "Rue de la Roquette",
            "Boulevard Saint-Germain",
            "Quai de la Tournelle",
            "Rue du Faubourg Saint-Antoine",
            "Avenue de la République",
            "Boulevard périphérique",
            "Rue Oberkampf",
        ],
        postcodes: &["75001", "75003", "75004", "75008", "75011", "75015", "75018", "75020"],
    },
    City {
        name: "Lyon",
        lat: 45.7640,
        lon: 4.8357,
        streets: &[
            "Rue de la République",
            "Cours Lafayette",
            "Quai Claude Bernard",
            "Avenue Jean Jaurès",
            "Rue Garibaldi",
            "Boulevard des Belges",
            "Tunnel de la Croix-Rousse",
        ],
        postcodes: &["69001", "69002", "69003", "69006", "69007", "69009"],
    },
    City {
        name: "Berlin",
        lat: 52.5200,
        lon: 13.4050,
        streets: &[
            "Unter den Linden",
            "Karl-Marx-Allee",
            "Kurfürstendamm",
            "Friedrichstraße",
            "Torstraße",
            "Stadtautobahn A100",
            "Sonnenallee",
            "Prenzlauer Allee",
        ],
        postcodes: &["10115", "10117", "10178", "10243", "10405", "12043", "10719"],
    },
    City {
        name: "Amsterdam",
        lat: 52.3676,
        lon: 4.9041,
        streets: &[
            "Damrak",
            "Prinsengracht",
            "Stadhouderskade",
            "Wibautstraat",
            "Ring A10 Zuid",
            "Overtoom",
            "Ferdinand Bolstraat",
        ],
        postcodes: &["1012 AB", "1017 CE", "1054 EX", "1073 KR", "1091 GR"],
    },
];

const MANEUVERS: &[&str] =
    &["depart", "turn-left", "turn-right", "continue", "roundabout", "merge", "fork-left", "fork-right", "ramp"];
const CATEGORIES: &[(&str, &[&str])] = &[
    ("fuel", &["TotalEnergies", "Shell", "Aral", "Esso", "BP"]),
    ("restaurant", &["Le Petit Zinc", "Chez Marcel", "Trattoria Roma", "Sushi Kan", "Brasserie du Nord"]),
    ("parking", &["Indigo", "Q-Park", "Saemes", "APCOA"]),
    ("ev_charging", &["Ionity", "Tesla Supercharger", "Allego", "Electra", "Fastned"]),
    ("cafe", &["Café de Flore", "Coffee Lab", "Espresso House", "Le Comptoir"]),
    ("pharmacy", &["Pharmacie Centrale", "Apotheke am Markt", "Pharmacie du Parc"]),
];
const TAGS: &[&str] = &[
    "wheelchair",
    "wifi",
    "card",
    "contactless",
    "24h",
    "toilets",
    "family",
    "outdoor_seating",
    "covered",
    "fast_charge",
    "vegetarian",
    "drive_through",
];
const WEATHER_EVENTS: &[(&str, &str)] = &[
    ("heavy_rain", "Heavy rain expected, up to 30 mm in one hour. Reduce speed and keep your distance."),
    ("snow", "Snowfall and icy roads. Winter tyres recommended; some passes may close."),
    ("fog", "Dense fog, visibility below 100 m on motorways. Use fog lights."),
    ("storm", "Storm warning: gusts up to 110 km/h. Avoid bridges and exposed roads if you can."),
    ("heat", "Heat wave: temperatures above 35 °C this afternoon. Carry water on long trips."),
];
const TRAFFIC_CAUSES: &[&str] = &["congestion", "roadworks", "event", "lane_closure", "slow_traffic"];
const INCIDENT_TYPES: &[(&str, &str)] = &[
    ("accident", "Accident involving two vehicles, right lane blocked. Emergency services on site."),
    ("breakdown", "Broken-down vehicle on the hard shoulder."),
    ("object_on_road", "Object on the road, caution advised."),
    ("closure", "Road closed in both directions, diversion signposted."),
    ("police", "Police checkpoint, expect delays."),
];
const SEVERITIES: &[&str] = &["minor", "moderate", "major", "severe"];
const DAYS: &[&str] = &["mo", "tu", "we", "th", "fr", "sa", "su"];

/// Makes payloads of every kind from one seeded random stream.
pub struct Generator {
    rng: StdRng,
    next_id: u64,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self { rng: StdRng::seed_from_u64(seed), next_id: seed.wrapping_mul(1_000_003) % 9_000_000 + 1_000_000 }
    }

    /// The next payload of `kind`, as compact JSON.
    pub fn next(&mut self, kind: Kind) -> Vec<u8> {
        let value = match kind {
            Kind::Route => self.route(),
            Kind::Poi => self.poi(),
            Kind::Weather => self.weather(),
            Kind::Traffic => self.traffic(),
            Kind::Incident => self.incident(),
        };
        // A Value built from strings and numbers always serializes.
        serde_json::to_vec(&value).unwrap_or_default()
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1 + self.rng.random_range(0..50u64);
        self.next_id
    }

    fn city(&mut self) -> &'static City {
        &CITIES[self.rng.random_range(0..CITIES.len())]
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.random_range(0..items.len())]
    }

    /// A point within about `km` kilometres of the city centre.
    fn near(&mut self, city: &City, km: f64) -> (f64, f64) {
        let dlat = self.rng.random_range(-km..km) / 111.0;
        let dlon = self.rng.random_range(-km..km) / (111.0 * city.lat.to_radians().cos());
        (round(city.lat + dlat, 6), round(city.lon + dlon, 6))
    }

    /// A driving path: a random walk of `points` points with a slowly turning heading.
    fn path(&mut self, start: (f64, f64), points: usize) -> Vec<(f64, f64)> {
        let mut heading: f64 = self.rng.random_range(0.0..std::f64::consts::TAU);
        let (mut lat, mut lon) = start;
        let mut out = Vec::with_capacity(points);
        for _ in 0..points {
            out.push((lat, lon));
            heading += self.rng.random_range(-0.35..0.35);
            // 20–120 m between shape points, as a router's simplified geometry has.
            let step_km = self.rng.random_range(0.02..0.12);
            lat += step_km * heading.cos() / 111.0;
            lon += step_km * heading.sin() / (111.0 * lat.to_radians().cos());
        }
        out
    }

    fn area(&mut self, centre: (f64, f64), radius_km: std::ops::Range<f64>) -> Value {
        let radius_km = self.rng.random_range(radius_km);
        let corners = self.rng.random_range(5..10usize);
        let mut ring: Vec<Value> = (0..corners)
            .map(|i| {
                let angle = std::f64::consts::TAU * i as f64 / corners as f64;
                let r = radius_km * self.rng.random_range(0.6..1.0);
                let lat = centre.0 + r * angle.cos() / 111.0;
                let lon = centre.1 + r * angle.sin() / (111.0 * centre.0.to_radians().cos());
                json!([round(lon, 5), round(lat, 5)])
            })
            .collect();
        // GeoJSON rings are closed.
        ring.push(ring[0].clone());
        json!({ "type": "Polygon", "coordinates": [ring] })
    }

    fn route(&mut self) -> Value {
        let city = self.city();
        let origin = self.near(city, 8.0);
        let points = self.rng.random_range(60..400usize);
        let path = self.path(origin, points);
        let distance_m: f64 = path.windows(2).map(|w| metres(w[0], w[1])).sum();
        let speed_ms = self.rng.random_range(7.0..16.0);
        let traffic_delay_s = self.rng.random_range(0..600u32);
        let step_count = self.rng.random_range(4..16usize);
        let mut steps = Vec::with_capacity(step_count);
        let mut left = distance_m;
        for i in 0..step_count {
            let street = self.pick(city.streets);
            let maneuver = if i == 0 { "depart" } else { self.pick(&MANEUVERS[1..]) };
            let dist = if i + 1 == step_count { left } else { left * self.rng.random_range(0.05..0.4) };
            left -= dist;
            let at = path[(i * points / step_count).min(points - 1)];
            steps.push(json!({
                "maneuver": maneuver,
                "instruction": instruction(maneuver, street),
                "street": street,
                "distance_m": dist.round(),
                "duration_s": (dist / speed_ms).round(),
                "location": [round(at.1, 6), round(at.0, 6)],
            }));
        }
        let duration_s = (distance_m / speed_ms).round() + traffic_delay_s as f64;
        json!({
            "route_id": format!("rt-{}-{:08x}", city.name.to_lowercase(), self.id()),
            "version": self.rng.random_range(1..40u32),
            "eta_unix": 1_795_000_000u64 + self.rng.random_range(0..86_400u64),
            "duration_s": duration_s,
            "distance_m": distance_m.round(),
            "traffic_delay_s": traffic_delay_s,
            "polyline": encode_polyline(&path),
            "steps": steps,
            "summary": format!("via {}", self.pick(city.streets)),
        })
    }

    fn poi(&mut self) -> Value {
        let city = self.city();
        let (lat, lon) = self.near(city, 10.0);
        let (category, brands) = self.pick(CATEGORIES);
        let tag_count = self.rng.random_range(1..6usize);
        let mut tags: Vec<&str> = (0..tag_count).map(|_| self.pick(TAGS)).collect();
        tags.sort_unstable();
        tags.dedup();
        let open = self.rng.random_range(6..10u32);
        let close = self.rng.random_range(18..24u32);
        let hours: serde_json::Map<String, Value> = DAYS
            .iter()
            .enumerate()
            .map(|(i, day)| {
                let value = if i == 6 && self.rng.random_bool(0.4) {
                    json!("closed")
                } else {
                    json!(format!("{open:02}:00-{close:02}:{}", if self.rng.random_bool(0.5) { "00" } else { "30" }))
                };
                (day.to_string(), value)
            })
            .collect();
        let number = self.rng.random_range(1..180u32);
        let street = self.pick(city.streets);
        let mut poi = json!({
            "poi_id": format!("poi-{:09}", self.id()),
            "name": format!("{} {}", self.pick(brands), street.split(' ').next_back().unwrap_or(street)),
            "category": category,
            "lat": lat,
            "lon": lon,
            "address": {
                "street": street,
                "number": number.to_string(),
                "postcode": self.pick(city.postcodes),
                "city": city.name,
            },
            "rating": round(self.rng.random_range(2.5..5.0), 1),
            "reviews": self.rng.random_range(3..4000u32),
            "opening_hours": hours,
            "tags": tags,
        });
        if category == "fuel" || category == "ev_charging" {
            poi["prices"] = json!({
                "currency": "EUR",
                "e10": round(self.rng.random_range(1.6..2.0), 3),
                "diesel": round(self.rng.random_range(1.5..1.9), 3),
                "kwh": round(self.rng.random_range(0.3..0.8), 2),
            });
        }
        poi
    }

    fn weather(&mut self) -> Value {
        let city = self.city();
        let (event, text) = self.pick(WEATHER_EVENTS);
        let centre = self.near(city, 20.0);
        let start = 1_795_000_000u64 + self.rng.random_range(0..86_400u64);
        json!({
            "alert_id": format!("wx-{:08}", self.id()),
            "kind": "weather",
            "event": event,
            "severity": self.pick(SEVERITIES),
            "area": self.area(centre, 5.0..40.0),
            "region": format!("{} metropolitan area", city.name),
            "valid_from_unix": start,
            "valid_until_unix": start + self.rng.random_range(1..12u64) * 3600,
            "text": text,
            "source": "meteo-feed",
        })
    }

    fn traffic(&mut self) -> Value {
        let city = self.city();
        let street = self.pick(city.streets);
        let from = self.near(city, 10.0);
        let points = self.rng.random_range(10..60usize);
        let path = self.path(from, points);
        let delay = self.rng.random_range(60..1800u32);
        json!({
            "alert_id": format!("tf-{:08}", self.id()),
            "kind": "traffic",
            "cause": self.pick(TRAFFIC_CAUSES),
            "severity": self.pick(SEVERITIES),
            "street": street,
            "direction": if self.rng.random_bool(0.5) { "inbound" } else { "outbound" },
            "speed_kmh": self.rng.random_range(3..45u32),
            "free_flow_kmh": self.pick(&[30u32, 50, 70, 90, 110]),
            "delay_s": delay,
            "length_m": path.windows(2).map(|w| metres(w[0], w[1])).sum::<f64>().round(),
            "polyline": encode_polyline(&path),
            "area": self.area(from, 0.5..3.0),
            "text": format!("Queue on {street}: about {} min of delay.", delay.div_ceil(60)),
        })
    }

    fn incident(&mut self) -> Value {
        let city = self.city();
        let (kind, text) = self.pick(INCIDENT_TYPES);
        let at = self.near(city, 12.0);
        let street = self.pick(city.streets);
        json!({
            "alert_id": format!("in-{:08}", self.id()),
            "kind": "incident",
            "type": kind,
            "severity": self.pick(SEVERITIES),
            "location": [at.1, at.0],
            "street": street,
            "lanes_blocked": self.rng.random_range(0..3u32),
            "area": self.area(at, 0.2..1.5),
            "reported_unix": 1_795_000_000u64 + self.rng.random_range(0..86_400u64),
            "confirmed_by": self.rng.random_range(1..40u32),
            "text": format!("{street}: {text}"),
        })
    }
}

fn instruction(maneuver: &str, street: &str) -> String {
    match maneuver {
        "depart" => format!("Head out on {street}"),
        "turn-left" => format!("Turn left onto {street}"),
        "turn-right" => format!("Turn right onto {street}"),
        "roundabout" => format!("At the roundabout, take the exit onto {street}"),
        "merge" => format!("Merge onto {street}"),
        "fork-left" => format!("Keep left to stay on {street}"),
        "fork-right" => format!("Keep right towards {street}"),
        "ramp" => format!("Take the ramp onto {street}"),
        _ => format!("Continue on {street}"),
    }
}

fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// Distance between two (lat, lon) points in metres (equirectangular: fine at city scale).
fn metres(a: (f64, f64), b: (f64, f64)) -> f64 {
    let mean_lat = ((a.0 + b.0) / 2.0).to_radians();
    let dx = (b.1 - a.1).to_radians() * mean_lat.cos();
    let dy = (b.0 - a.0).to_radians();
    6_371_000.0 * (dx * dx + dy * dy).sqrt()
}

/// The encoded polyline format map SDKs read (precision 5): each coordinate as a zig-zag
/// varint of its difference to the previous point, in 5-bit groups offset into printable ASCII.
pub fn encode_polyline(points: &[(f64, f64)]) -> String {
    let mut out = String::with_capacity(points.len() * 8);
    let (mut last_lat, mut last_lon) = (0i64, 0i64);
    for &(lat, lon) in points {
        let (lat, lon) = ((lat * 1e5).round() as i64, (lon * 1e5).round() as i64);
        for delta in [lat - last_lat, lon - last_lon] {
            let mut value = if delta < 0 { !(delta << 1) } else { delta << 1 } as u64;
            while value >= 0x20 {
                out.push(char::from((0x20 | (value & 0x1f)) as u8 + 63));
                value >>= 5;
            }
            out.push(char::from(value as u8 + 63));
        }
        (last_lat, last_lon) = (lat, lon);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_bytes() {
        for kind in Kind::ALL {
            let a: Vec<Vec<u8>> = {
                let mut g = Generator::new(7);
                (0..5).map(|_| g.next(kind)).collect()
            };
            let mut g = Generator::new(7);
            let b: Vec<Vec<u8>> = (0..5).map(|_| g.next(kind)).collect();
            assert_eq!(a, b, "{kind:?}");
            let mut other = Generator::new(8);
            assert_ne!(a[0], other.next(kind), "{kind:?}: another seed, other bytes");
        }
    }

    #[test]
    fn payloads_are_plausible_json() {
        let mut g = Generator::new(1);
        for _ in 0..20 {
            let route: Value = serde_json::from_slice(&g.next(Kind::Route)).unwrap();
            let polyline = route["polyline"].as_str().unwrap();
            assert!((100..4000).contains(&polyline.len()), "polyline of {} chars", polyline.len());
            let steps = route["steps"].as_array().unwrap();
            assert!(steps.len() >= 4 && steps[0]["instruction"].as_str().unwrap().starts_with("Head out on"));
            let total: f64 = steps.iter().map(|s| s["distance_m"].as_f64().unwrap()).sum();
            let distance = route["distance_m"].as_f64().unwrap();
            assert!((total - distance).abs() <= steps.len() as f64, "steps add up to the route");
            assert!(distance > 1000.0 && distance < 60_000.0, "{distance} m");

            let poi: Value = serde_json::from_slice(&g.next(Kind::Poi)).unwrap();
            assert!(poi["lat"].as_f64().unwrap() > 40.0 && poi["lat"].as_f64().unwrap() < 56.0);
            let rating = poi["rating"].as_f64().unwrap();
            assert!((2.5..=5.0).contains(&rating));
            assert_eq!(poi["opening_hours"].as_object().unwrap().len(), 7);

            for kind in [Kind::Weather, Kind::Traffic, Kind::Incident] {
                let alert: Value = serde_json::from_slice(&g.next(kind)).unwrap();
                assert!(SEVERITIES.contains(&alert["severity"].as_str().unwrap()));
                let ring = alert["area"]["coordinates"][0].as_array().unwrap();
                assert!(ring.len() >= 6);
                assert_eq!(ring.first(), ring.last(), "closed polygon");
                assert!(!alert["text"].as_str().unwrap().is_empty());
            }
        }
    }

    #[test]
    fn sizes_are_realistic() {
        let mut g = Generator::new(3);
        let mean = |g: &mut Generator, kind| (0..50).map(|_| g.next(kind).len()).sum::<usize>() / 50;
        let route = mean(&mut g, Kind::Route);
        let poi = mean(&mut g, Kind::Poi);
        assert!((1500..8000).contains(&route), "route mean {route} B");
        assert!((300..1200).contains(&poi), "poi mean {poi} B");
    }

    #[test]
    fn polyline_matches_the_published_example() {
        // The format's documented example.
        let points = [(38.5, -120.2), (40.7, -120.95), (43.252, -126.453)];
        assert_eq!(encode_polyline(&points), "_p~iF~ps|U_ulLnnqC_mqNvxq`@");
    }

    #[test]
    fn kinds_parse_by_name() {
        for kind in Kind::ALL {
            assert_eq!(kind.name().parse::<Kind>().unwrap(), kind);
        }
        assert!("synthetic".parse::<Kind>().is_err());
    }
}
