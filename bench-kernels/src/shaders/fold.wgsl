// Between rounds: every entry of C back into [-bound, bound], exactly as the
// verifier's challenge::reduce does (C mod (2 bound + 1), shifted). Every
// entry is an integer below 2^24, so the i32 arithmetic is exact. The
// padding (rows and columns from n to the padded side) stays zero.

struct Params {
    n: u32,
    stride: u32,
    bound: i32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

@compute @workgroup_size(16, 16, 1)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    if (g.x >= p.stride || g.y >= p.stride) {
        return;
    }
    let i = g.y * p.stride + g.x;
    if (g.x >= p.n || g.y >= p.n) {
        dst[i] = 0.0;
        return;
    }
    let m = 2 * p.bound + 1;
    var r = i32(src[i]) % m;
    if (r < 0) {
        r = r + m;
    }
    dst[i] = f32(r - p.bound);
}
