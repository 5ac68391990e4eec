// C = A x B for row-major f32 matrices of small integers (exact: see
// challenge.rs), padded with zeros to a side `stride` that is a multiple of
// 64 (the host pads; zeros add nothing to a product). A workgroup of
// 16 x 16 threads computes a 64 x 64 tile of C, a thread 4 rows x 4
// columns, stepping through k 32 at a time with both operands' tiles in
// workgroup memory (16 KiB, WebGPU's least maximum). Everything moves as
// vec4s: a quarter of the loads of scalars.

struct Params {
    // The challenge's side, and the padded side.
    n: u32,
    stride: u32,
    bound: i32,
    pad: u32,
}

@group(0) @binding(0) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> b: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> p: Params;

const TS: u32 = 64u;
const TK: u32 = 32u;

// A's tile: 64 rows x 8 vec4 (32 k). B's tile: 32 k x 16 vec4 (64 columns).
var<workgroup> ta: array<vec4<f32>, 512>;
var<workgroup> tb: array<vec4<f32>, 512>;

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    // Vec4s per row.
    let w = p.stride / 4u;
    let row0 = wid.y * TS;
    let q0 = wid.x * (TS / 4u);
    let t = lid.y * 16u + lid.x;
    // Rows y, y + 16, y + 32, y + 48 of the tile; columns 4x to 4x + 3.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.stride; k0 = k0 + TK) {
        for (var i = 0u; i < 2u; i = i + 1u) {
            // Neighbouring threads read neighbouring vec4s of a row.
            let e = t + i * 256u;
            ta[e] = a[(row0 + e / 8u) * w + k0 / 4u + e % 8u];
            tb[e] = b[(k0 + e / 16u) * w + q0 + e % 16u];
        }
        workgroupBarrier();
        for (var kq = 0u; kq < TK / 4u; kq = kq + 1u) {
            let kb = 64u * kq + lid.x;
            let b0 = tb[kb];
            let b1 = tb[kb + 16u];
            let b2 = tb[kb + 32u];
            let b3 = tb[kb + 48u];
            let ka = lid.y * 8u + kq;
            var v = ta[ka];
            acc0 = fma(vec4<f32>(v.x), b0, acc0);
            acc0 = fma(vec4<f32>(v.y), b1, acc0);
            acc0 = fma(vec4<f32>(v.z), b2, acc0);
            acc0 = fma(vec4<f32>(v.w), b3, acc0);
            v = ta[ka + 128u];
            acc1 = fma(vec4<f32>(v.x), b0, acc1);
            acc1 = fma(vec4<f32>(v.y), b1, acc1);
            acc1 = fma(vec4<f32>(v.z), b2, acc1);
            acc1 = fma(vec4<f32>(v.w), b3, acc1);
            v = ta[ka + 256u];
            acc2 = fma(vec4<f32>(v.x), b0, acc2);
            acc2 = fma(vec4<f32>(v.y), b1, acc2);
            acc2 = fma(vec4<f32>(v.z), b2, acc2);
            acc2 = fma(vec4<f32>(v.w), b3, acc2);
            v = ta[ka + 384u];
            acc3 = fma(vec4<f32>(v.x), b0, acc3);
            acc3 = fma(vec4<f32>(v.y), b1, acc3);
            acc3 = fma(vec4<f32>(v.z), b2, acc3);
            acc3 = fma(vec4<f32>(v.w), b3, acc3);
        }
        workgroupBarrier();
    }
    let out = (row0 + lid.y) * w + q0 + lid.x;
    c[out] = acc0;
    c[out + 16u * w] = acc1;
    c[out + 32u * w] = acc2;
    c[out + 48u * w] = acc3;
}
