// torch's CPU `Tensor.bernoulli_(p)` (a float p: what every dropout mask is drawn with), the same draws
// ~10x faster. torch draws one element at a time (a serial loop over the Mersenne Twister, one call and
// one double per element); here the twister's state is regenerated and tempered in vectorisable loops, and
// the mask is a vectorisable integer comparison. Each element still takes one 64-bit draw (two 32-bit
// outputs, the first the high word) of the same generator, kept as its low 53 bits x, and is 1 where
// x * 2^-53 < p, which is x < ceil(p * 2^53): the same masks and the same generator state afterwards.
// What this does not cover (a non-contiguous tensor, p outside [0, 1], another dtype) goes to torch's own kernel.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/core/MT19937RNGEngine.h>
#include <ATen/ops/bernoulli_native.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>

namespace {

constexpr int kN = 624, kM = 397;  // MT19937: the state's words, the twist's offset

inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

// The next 624 words of state. Each loop reads words ahead of the one it writes, or 227 behind it: no
// dependence a vector's width can see.
void regenerate(uint32_t* __restrict s) {
  for (int i = 0; i < kN - kM; ++i) s[i] = s[i + kM] ^ twist(s[i], s[i + 1]);
  for (int i = kN - kM; i < kN - 1; ++i) s[i] = s[i + kM - kN] ^ twist(s[i], s[i + 1]);
  s[kN - 1] = s[kM - 1] ^ twist(s[kN - 1], s[0]);
}

// The engine's next `count` outputs, as at::mt19937's operator() gives them one by one: it regenerates
// when `left_` counts down to 0, then sets left_ = 624, next_ = 0 and hands out state_[next_++].
void draw(at::mt19937_data_pod& d, uint32_t* __restrict out, int64_t count) {
  while (count > 0) {
    if (d.left_ == 1) {
      regenerate(d.state_.data());
      d.left_ = kN + 1;  // what the decrement before the regeneration leaves as 624
      d.next_ = 0;
    }
    const int take = static_cast<int>(std::min<int64_t>(count, d.left_ - 1));
    const uint32_t* s = d.state_.data() + d.next_;
    for (int i = 0; i < take; ++i) {  // tempering
      uint32_t y = s[i];
      y ^= y >> 11;
      y ^= (y << 7) & 0x9d2c5680u;
      y ^= (y << 15) & 0xefc60000u;
      y ^= y >> 18;
      out[i] = y;
    }
    d.next_ += take;
    d.left_ -= take;
    out += take;
    count -= take;
  }
}

template <typename T>
void mask(T* __restrict out, const uint32_t* __restrict words, int64_t n, uint64_t threshold) {
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t x = (static_cast<uint64_t>(words[2 * i] & 0x1fffffu) << 32) | words[2 * i + 1];
    out[i] = static_cast<T>(x < threshold ? 1 : 0);
  }
}

// The dtypes torch's kernel draws for (what AT_DISPATCH_ALL_TYPES_AND3 below covers); others get its error.
bool drawable(at::ScalarType t) {
  switch (t) {
    case at::kByte: case at::kChar: case at::kShort: case at::kInt: case at::kLong: case at::kFloat:
    case at::kDouble: case at::kBool: case at::kBFloat16: case at::kHalf:
      return true;
    default:
      return false;
  }
}

at::Tensor& bernoulli_(at::Tensor& self, double p, std::optional<at::Generator> gen) {
  if (!(p >= 0.0 && p <= 1.0) || !self.is_contiguous() || self.numel() == 0 || !drawable(self.scalar_type())) {
    return at::native::bernoulli_(self, p, std::move(gen));
  }
  auto* generator = at::get_generator_or_default<at::CPUGeneratorImpl>(gen, at::detail::getDefaultCPUGenerator());
  const auto threshold = static_cast<uint64_t>(std::ceil(std::ldexp(p, 53)));
  constexpr int64_t kChunk = 4096;  // elements a pass: their words stay in L1
  uint32_t words[2 * kChunk];
  const int64_t n = self.numel();
  std::lock_guard<std::mutex> lock(generator->mutex_);  // as torch's kernel holds it
  at::mt19937 engine = generator->engine();
  at::mt19937_data_pod state = engine.data();
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kBFloat16, at::kHalf, self.scalar_type(), "bernoulli_", [&] {
    scalar_t* out = self.data_ptr<scalar_t>();
    for (int64_t start = 0; start < n; start += kChunk) {
      const int64_t len = std::min(kChunk, n - start);
      draw(state, words, 2 * len);
      mask(out + start, words, len, threshold);
    }
  });
  engine.set_data(state);
  generator->set_engine(engine);
  return self;
}

std::unique_ptr<torch::Library> registration;  // while set, aten::bernoulli_.float on CPU comes here

bool set_enabled(bool on) {
  if (on && !registration) {
    registration = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::CPU,
                                                    __FILE__, __LINE__);
    registration->impl("bernoulli_.float", TORCH_FN(bernoulli_));
  } else if (!on) {
    registration.reset();  // torch's own kernel again
  }
  return registration != nullptr;
}

}  // namespace

TORCH_LIBRARY(fast_bernoulli, m) { m.def("set_enabled(bool on) -> bool", &set_enabled); }
