//! safetensors headers, as the engine reads `model.safetensors` and `optimizer.safetensors`:
//! deserialise, then look at every tensor's name, dtype, shape and bytes. What the engine
//! relies on when it turns bytes into a tensor: a tensor's bytes are exactly its element
//! count times its element size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use safetensors::SafeTensors;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = SafeTensors::deserialize(data) else {
        return;
    };
    for (name, view) in file.tensors() {
        let elements = view.shape().iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let bits = elements.and_then(|n| n.checked_mul(view.dtype().bitsize()));
        assert_eq!(
            bits,
            Some(view.data().len() * 8),
            "`{name}`: {:?} {:?} in {} bytes",
            view.dtype(),
            view.shape(),
            view.data().len()
        );
    }
});
