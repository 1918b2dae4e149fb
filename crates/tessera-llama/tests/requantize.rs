//! The default model's Q8_0 file is derived from the published Q4_1 file by
//! Tessera's own requantizer (`tessera-models`), so that every machine gets
//! the same bytes. Here it is checked against llama.cpp's quantizer on the
//! real files: every tensor's data must be byte-identical to what
//! `llama_model_quantize` writes for Q8_0, and the file must load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tessera_engine::Model;
use tessera_models::gguf::{self, TensorInfo};

/// The model store `make test` filled (`models pull` keeps the source).
fn store() -> tessera_models::ModelStore {
    let home = std::env::var_os("TESSERA_TEST_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tessera/home"),
        PathBuf::from,
    );
    tessera_models::ModelStore::open(&home).expect("model store")
}

fn data(path: &Path, t: &TensorInfo) -> Vec<u8> {
    let n = gguf::tensor_bytes(t).expect("a known tensor type") as usize;
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(t.offset)).unwrap();
    let mut b = vec![0u8; n];
    f.read_exact(&mut b).unwrap();
    b
}

#[test]
fn derived_q8_0_matches_llama_cpp_quantizer_tensor_for_tensor() {
    let store = store();
    let source = store
        .resolve(tessera_models::SMOLLM2_Q4_1.alias)
        .or_else(|_| store.pull(tessera_models::SMOLLM2_Q4_1.alias, &mut |_, _| {}))
        .expect("the published Q4_1 file");
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.gguf");
    let theirs = dir.path().join("llama.gguf");
    let stats = gguf::requantize_q4_1_to_q8_0(&source.path, &ours).unwrap();
    assert_eq!(stats.converted, 210, "every Q4_1 weight becomes Q8_0");
    let (sha, size) = tessera_models::hash_file(&ours, &mut |_, _| {}).unwrap();
    assert_eq!(
        sha,
        tessera_models::DEFAULT_MODEL.sha256,
        "the pinned bytes"
    );
    assert_eq!(size, tessera_models::DEFAULT_MODEL.size);

    tessera_llama::requantize(&source.path, &theirs, tessera_llama::Quantization::Q8_0, 2).unwrap();
    let (a, b) = (
        gguf::tensors(&ours).unwrap(),
        gguf::tensors(&theirs).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    let mut differing = Vec::new();
    for t in &a {
        let u = b.iter().find(|u| u.name == t.name).expect("same tensors");
        assert_eq!((t.kind, &t.dims), (u.kind, &u.dims), "{}", t.name);
        if data(&ours, t) != data(&theirs, u) {
            differing.push(t.name.clone());
        }
    }
    assert!(differing.is_empty(), "tensors differ: {differing:?}");

    // And llama.cpp loads it as the same model.
    let file = tessera_llama::LlamaModelFile::load(&ours).unwrap();
    let src = tessera_llama::LlamaModelFile::load(&source.path).unwrap();
    assert_eq!(file.info().n_vocab, src.info().n_vocab);
    assert_eq!(
        file.tokenize("Hello, world!", true).unwrap(),
        src.tokenize("Hello, world!", true).unwrap()
    );
}
