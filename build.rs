//! Compiles `proto/realtime.proto` with protox (pure Rust), so a fresh machine needs no `protoc`.
fn main() {
    println!("cargo:rerun-if-changed=proto/realtime.proto");
    let descriptors = match protox::compile(["proto/realtime.proto"], ["proto"]) {
        Ok(fds) => fds,
        Err(err) => panic!("proto/realtime.proto does not compile: {err:?}"),
    };
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    if let Err(err) = config.compile_fds(descriptors) {
        panic!("generating Rust from proto/realtime.proto failed: {err}");
    }
}
