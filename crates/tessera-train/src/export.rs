//! A trained model as a file: safetensors (the format Hugging Face and
//! candle load), one tensor per weight and bias, little-endian `F32`, with
//! the model's architecture in the header's metadata.

use crate::trainer::ModelSpec;

/// Names of the model's tensors, in the flat vector's order.
pub fn tensor_names(spec: &ModelSpec) -> Vec<String> {
    (0..spec.shapes().len())
        .map(|i| {
            let kind = if i % 2 == 0 { "weight" } else { "bias" };
            format!("layer{}.{kind}", i / 2)
        })
        .collect()
}

/// The safetensors bytes of `parameters` (of a model shaped `spec`), with
/// `metadata` (string pairs) and the spec itself (`tessera.model`, JSON)
/// in the header. An error when the vector does not fit the spec.
pub fn safetensors(
    spec: &ModelSpec,
    parameters: &[f32],
    metadata: &[(&str, String)],
) -> Result<Vec<u8>, crate::TrainError> {
    let tensors: Vec<(String, Vec<usize>)> =
        tensor_names(spec).into_iter().zip(spec.shapes()).collect();
    let mut meta = metadata.to_vec();
    meta.push(("tessera.model", format!("{spec:?}")));
    named(&tensors, parameters, &meta)
}

/// The safetensors bytes of a language model's parameters (tensors named
/// as [`crate::lm::LmSpec::shapes`] names them; the head is tied to
/// `tok_emb`).
pub fn safetensors_lm(
    spec: &crate::lm::LmSpec,
    parameters: &[f32],
    metadata: &[(&str, String)],
) -> Result<Vec<u8>, crate::TrainError> {
    let mut meta = metadata.to_vec();
    meta.push(("tessera.model", format!("{spec:?}")));
    named(&spec.shapes(), parameters, &meta)
}

/// The safetensors bytes of `parameters` cut into `tensors` (name, shape),
/// with `metadata` in the header.
pub fn named(
    tensors: &[(String, Vec<usize>)],
    parameters: &[f32],
    metadata: &[(&str, String)],
) -> Result<Vec<u8>, crate::TrainError> {
    let total: usize = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    if parameters.len() != total {
        return Err(crate::TrainError::Shape(format!(
            "{} parameters for a model of {total}",
            parameters.len(),
        )));
    }
    let mut header = String::from("{\"__metadata__\":{");
    for (i, (k, v)) in metadata.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!("{}:{}", quote(k), quote(v)));
    }
    header.push('}');
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        header.push_str(&format!(
            ",{}:{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            quote(name),
            dims.join(","),
            offset,
            offset + bytes
        ));
        offset += bytes;
    }
    header.push('}');
    // The data starts 8-byte aligned (the format allows trailing spaces).
    while (8 + header.len()) % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for p in parameters {
        out.extend_from_slice(&p.to_le_bytes());
    }
    Ok(out)
}

/// A JSON string literal.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_valid_safetensors_with_every_tensor_where_its_header_says() {
        let spec = ModelSpec::Mlp {
            inputs: 3,
            hidden: 2,
            classes: 2,
        };
        let params: Vec<f32> = (0..spec.parameters()).map(|i| i as f32 * 0.5).collect();
        let bytes = safetensors(&spec, &params, &[("task", "t\"1".into())]).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0, "data aligned");
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(header["__metadata__"]["task"], "t\"1");
        let data = &bytes[8 + n..];
        assert_eq!(data.len(), params.len() * 4);
        let b = &header["layer1.bias"];
        assert_eq!(b["shape"], serde_json::json!([2]));
        let [start, end] = [0, 1].map(|i| b["data_offsets"][i].as_u64().unwrap() as usize);
        let bias: Vec<f32> = data[start..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(bias, params[params.len() - 2..]);
        assert!(safetensors(&spec, &params[1..], &[]).is_err());
    }
}
