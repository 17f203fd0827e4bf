use super::*;
use crate::config::Auth;
use crate::core::channel::MAX_PATTERN_LEN;
use serde_json::json;

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";
const NOW: u64 = 1_800_000_000;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn config() -> Auth {
    Auth {
        hmac_secret: SECRET.into(),
        public_key_files: vec![fixture("rsa-public.pem"), fixture("ec-public.pem")],
        ..Auth::default()
    }
}

fn verifier(config: &Auth) -> Arc<Verifier> {
    Verifier::setup(config, NOW).unwrap().verifier.unwrap()
}

fn sign(alg: Algorithm, claims: serde_json::Value) -> String {
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa-private.pem")).unwrap()).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&std::fs::read(fixture("ec-private.pem")).unwrap()).unwrap(),
        other => panic!("no test key for {other:?}"),
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap()
}

fn failure(token: &str) -> AuthFailure {
    verifier(&config()).verify(token, NOW).unwrap_err().failure
}

#[test]
fn each_supported_algorithm_verifies() {
    for alg in [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256] {
        let token = sign(alg, json!({"sub": "u1", "exp": NOW + 60}));
        let grant = verifier(&config()).verify(&token, NOW).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(grant.subject.as_deref(), Some("u1"));
        assert_eq!(grant.expires_at_unix, NOW + 60);
    }
}

#[test]
fn alg_none_is_refused_by_name() {
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"u1","exp":9999999999}"#);
    assert_eq!(failure(&format!("{header}.{claims}.")), AuthFailure::AlgNone);
}

#[test]
fn refusals_have_their_reasons() {
    let forged = {
        let key = EncodingKey::from_secret(b"another-secret-another-secret-xx");
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &json!({"sub": "u1", "exp": NOW + 60}), &key).unwrap()
    };
    assert_eq!(failure(&forged), AuthFailure::BadSignature);
    assert_eq!(failure(""), AuthFailure::MissingToken);
    assert_eq!(failure("not-a-token"), AuthFailure::Malformed);
    assert_eq!(failure(&sign(Algorithm::HS256, json!({"sub": "u1", "exp": NOW - 10}))), AuthFailure::Expired);
    let early = json!({"sub": "u1", "exp": NOW + 600, "nbf": NOW + 300});
    assert_eq!(failure(&sign(Algorithm::HS256, early)), AuthFailure::NotYetValid);
    assert_eq!(failure(&sign(Algorithm::HS256, json!({"exp": NOW + 60}))), AuthFailure::MissingClaim);
    assert_eq!(failure(&sign(Algorithm::HS256, json!({"sub": "u1"}))), AuthFailure::MissingClaim);
    let bad_pattern = json!({"sub": "u1", "exp": NOW + 60, "subscribe": ["route:#"]});
    assert_eq!(failure(&sign(Algorithm::HS256, bad_pattern)), AuthFailure::BadClaim);
}

#[test]
fn an_algorithm_without_a_configured_key_is_refused() {
    let only_hmac = Auth { hmac_secret: SECRET.into(), ..Auth::default() };
    let token = sign(Algorithm::RS256, json!({"sub": "u1", "exp": NOW + 60}));
    assert_eq!(verifier(&only_hmac).verify(&token, NOW).unwrap_err().failure, AuthFailure::WrongAlgorithm);
    // An RS256 header on an HMAC signature (the classic key-confusion attack) fails too.
    let only_rsa = Auth { public_key_files: vec![fixture("rsa-public.pem")], ..Auth::default() };
    let confused = sign(Algorithm::HS256, json!({"sub": "u1", "exp": NOW + 60}));
    assert_eq!(verifier(&only_rsa).verify(&confused, NOW).unwrap_err().failure, AuthFailure::WrongAlgorithm);
}

#[test]
fn audience_and_issuer_are_checked_when_configured() {
    let strict = Auth { audience: "routopia".into(), issuer: "https://id.routopia".into(), ..config() };
    let v = verifier(&strict);
    let good = json!({"sub": "u1", "exp": NOW + 60, "aud": "routopia", "iss": "https://id.routopia"});
    v.verify(&sign(Algorithm::HS256, good), NOW).unwrap();
    let wrong_aud = json!({"sub": "u1", "exp": NOW + 60, "aud": "other", "iss": "https://id.routopia"});
    assert_eq!(v.verify(&sign(Algorithm::HS256, wrong_aud), NOW).unwrap_err().failure, AuthFailure::WrongAudience);
    let wrong_iss = json!({"sub": "u1", "exp": NOW + 60, "aud": "routopia", "iss": "evil"});
    assert_eq!(v.verify(&sign(Algorithm::HS256, wrong_iss), NOW).unwrap_err().failure, AuthFailure::WrongIssuer);
}

#[test]
fn leeway_applies_to_expiry() {
    let v = verifier(&config());
    let token = sign(Algorithm::HS256, json!({"sub": "u1", "exp": NOW - 3}));
    v.verify(&token, NOW).unwrap();
    assert_eq!(v.verify(&token, NOW + 3).unwrap_err().failure, AuthFailure::Expired);
}

#[test]
fn an_exp_beyond_the_lifetime_horizon_is_a_bad_claim() {
    let v = verifier(&config());
    let horizon = NOW + Auth::default().max_token_lifetime.as_secs();
    for exp in [u64::MAX, i64::MAX as u64, horizon + 1] {
        let refusal = v.verify(&sign(Algorithm::HS256, json!({"sub": "u1", "exp": exp})), NOW).unwrap_err();
        assert_eq!(refusal.failure, AuthFailure::BadClaim, "exp {exp}: {refusal}");
        assert!(refusal.detail.contains("max_token_lifetime"), "{refusal}");
    }
    let at_horizon = sign(Algorithm::HS256, json!({"sub": "u1", "exp": horizon}));
    assert_eq!(v.verify(&at_horizon, NOW).unwrap().expires_at_unix, horizon);
    // Absurd times elsewhere are refused by the rules that already apply, without overflow.
    let never_valid = json!({"sub": "u1", "exp": NOW + 60, "nbf": u64::MAX});
    assert_eq!(v.verify(&sign(Algorithm::HS256, never_valid), NOW).unwrap_err().failure, AuthFailure::NotYetValid);
    let at_end_of_time = sign(Algorithm::HS256, json!({"sub": "u1", "exp": NOW + 60}));
    assert_eq!(v.verify(&at_end_of_time, u64::MAX).unwrap_err().failure, AuthFailure::Expired);
    let short = Auth { max_token_lifetime: std::time::Duration::from_secs(3600), ..config() };
    let day = sign(Algorithm::HS256, json!({"sub": "u1", "exp": NOW + 86_400}));
    assert_eq!(verifier(&short).verify(&day, NOW).unwrap_err().failure, AuthFailure::BadClaim);
}

#[test]
fn default_permissions_keep_users_to_their_own_route() {
    let grant =
        verifier(&config()).verify(&sign(Algorithm::HS256, json!({"sub": "alice", "exp": NOW + 60})), NOW).unwrap();
    assert!(grant.may_subscribe("route:alice"));
    assert!(!grant.may_subscribe("route:bob"));
    assert!(!grant.may_subscribe("route:alice2"));
    assert!(grant.may_subscribe("weather:paris"));
    assert!(!grant.may_subscribe("admin:all"));
    assert!(!grant.may_publish("route:alice"));
}

#[test]
fn claimed_patterns_replace_the_defaults() {
    let claims =
        json!({"sub": "fleet-7", "exp": NOW + 60, "subscribe": ["route:{sub}:*", "traffic:*"], "publish": ["poi:*"]});
    let grant = verifier(&config()).verify(&sign(Algorithm::HS256, claims), NOW).unwrap();
    assert!(grant.may_subscribe("route:fleet-7:truck-1"));
    assert!(!grant.may_subscribe("route:fleet-8:truck-1"));
    assert!(!grant.may_subscribe("weather:paris"));
    assert!(grant.may_publish("poi:u09tv"));
    assert!(!grant.may_publish("traffic:a1"));
}

#[test]
fn a_subject_with_pattern_characters_is_matched_literally() {
    let pattern = ChannelPattern::parse("route:{sub}").unwrap();
    assert!(!pattern.matches("route:anything", "*"));
    assert!(!pattern.matches("route:", ""));
    assert!(ChannelPattern::parse("a*b*c").unwrap().matches("a-x-b-y-c", ""));
    assert!(!ChannelPattern::parse("a*b*c").unwrap().matches("a-x-c-b", ""));
    assert!(ChannelPattern::parse("route:{").is_err());
}

#[test]
fn without_keys_a_development_secret_and_token_are_made() {
    let setup = Verifier::setup(&Auth::default(), NOW).unwrap();
    let token = setup.development_token.expect("a development token");
    let grant = setup.verifier.unwrap().verify(&token, NOW).unwrap();
    assert!(grant.may_subscribe("route:anyone") && grant.may_publish("route:anyone"));
    // Another run signs with another secret.
    let other = Verifier::setup(&Auth::default(), NOW).unwrap().verifier.unwrap();
    assert_eq!(other.verify(&token, NOW).unwrap_err().failure, AuthFailure::BadSignature);
}

#[test]
fn disabled_mode_has_no_verifier() {
    let setup = Verifier::setup(&Auth { mode: AuthMode::Disabled, ..Auth::default() }, NOW).unwrap();
    assert!(setup.verifier.is_none() && setup.development_token.is_none());
}

/// Comparisons the matcher makes for `pattern` against `channel`.
fn steps(pattern: &str, channel: &str, subject: &str) -> (bool, u64) {
    let mut steps = 0;
    let matched =
        ChannelPattern::parse(pattern).unwrap().matches_counting(channel.as_bytes(), subject.as_bytes(), &mut steps);
    (matched, steps)
}

#[test]
fn many_stars_cost_at_most_channel_length_times_pattern_length() {
    let pattern = "*:*:*:*:*:x";
    // At most (channel length + 1) × (pattern bytes + 1) comparisons, whatever the channel.
    let bound = |channel: &str| (channel.len() as u64 + 1) * (pattern.len() as u64 + 1);
    let channels = [(":".repeat(128), false), ("a:".repeat(64), false), (format!("{}x", ":".repeat(127)), true)];
    for (channel, expected) in channels {
        let (matched, new) = steps(pattern, &channel, "");
        assert_eq!(matched, expected, "{channel}");
        assert!(new <= bound(&channel), "{new} comparisons for {channel:?}");
    }
    // The backtracking matcher went far past that bound (0.85 s at 128 characters); shorter
    // here, so the test stays quick, and still thousands of times over.
    let channel = ":".repeat(40);
    let mut old_steps = 0;
    assert!(!backtracking::matches(pattern, &channel, "", &mut old_steps));
    assert!(old_steps > 1000 * bound(&channel), "{old_steps}");
    assert!(steps(pattern, &channel, "").1 <= bound(&channel));
}

#[test]
fn the_matcher_agrees_with_the_backtracking_one_on_generated_cases() {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let pick = |rng: &mut rand::rngs::StdRng, alphabet: &[&str], max: usize| -> String {
        let len = rng.random_range(0..=max);
        (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect()
    };
    let (mut matched, mut cases) = (0, 0);
    while cases < 20_000 {
        let pattern = pick(&mut rng, &["a", "b", ":", "*", "*", "{sub}"], 10);
        let Ok(parsed) = ChannelPattern::parse(&pattern) else { continue };
        let channel = pick(&mut rng, &["a", "b", ":", "ab", "a:"], 12);
        let subject = pick(&mut rng, &["a", "b", ":", "*"], 3);
        let expected = backtracking::matches(&pattern, &channel, &subject, &mut 0);
        assert_eq!(parsed.matches(&channel, &subject), expected, "{pattern:?} {channel:?} {subject:?}");
        matched += usize::from(expected);
        cases += 1;
    }
    // Both outcomes are well represented, or the comparison would prove little.
    assert!((2_000..18_000).contains(&matched), "{matched} of {cases} matched");
}

#[test]
fn claimed_patterns_are_bounded_in_number_and_bytes() {
    let v = verifier(&config());
    let refused = |patterns: Vec<String>| {
        let claims = json!({"sub": "u1", "exp": NOW + 60, "subscribe": patterns});
        v.verify(&sign(Algorithm::HS256, claims), NOW).err().map(|r| r.failure)
    };
    assert_eq!(refused(vec!["a*".into(); MAX_CLAIMED_PATTERNS]), None);
    assert_eq!(refused(vec!["a*".into(); MAX_CLAIMED_PATTERNS + 1]), Some(AuthFailure::BadClaim));
    let long = format!("{}*", "a".repeat(MAX_PATTERN_LEN - 1));
    let fitting = MAX_CLAIMED_PATTERN_BYTES / MAX_PATTERN_LEN;
    assert_eq!(refused(vec![long.clone(); fitting]), None);
    assert_eq!(refused(vec![long.clone(); fitting + 1]), Some(AuthFailure::BadClaim));
    assert_eq!(refused(vec![format!("{long}a")]), Some(AuthFailure::BadClaim), "one pattern over the length");
}
