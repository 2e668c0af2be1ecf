// apudae-runner: adaptive purification (APuDAE) of PGM/PPM images from C++.
//
// It loads the DAE's step graph, compiled ahead of time by AOTInductor
// (`apudae-engine export --aoti`), and runs the adaptive loop around it with ATen ops.
// The step graph maps images y (N, C, H, W) to the per-image reconstruction error r (N,)
// and dr/dy. The loop follows engine/reference.py: the same counter-based noise, the same
// hinge and the same Adam constants, so its outputs match the Python reference to float
// rounding. Image identities are the pixel fingerprint that the Python API uses by default.
//
// Usage:
//   apudae-runner --package STEP.pt2 --meta STEP.json --out DIR [--seed S] [--steps T]
//                 [--lr X] [--noise-eps X] [--no-noise] [--no-clip] IMAGE.pgm|ppm ...
// Images must be binary PGM (P5, 1-channel models) or PPM (P6, 3-channel models), 8-bit,
// at the model's input size. One line per image goes to stdout: the path, r before and r
// after purification. Bad files get one error line on stderr and do not stop the others;
// the exit status is 1 when any file failed.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

constexpr int64_t kMask32 = 0xFFFFFFFFLL;
constexpr int64_t kGolden = 0x9E3779B9LL;

// (x * c) mod 2^32 for int64 x in [0, 2^32), split so that no product overflows int64.
at::Tensor mul32(const at::Tensor& x, int64_t c) {
  at::Tensor lo = x.bitwise_and(0xFFFF);
  at::Tensor hi = at::bitwise_right_shift(x, 16);
  at::Tensor high_part = at::bitwise_left_shift((hi * c).bitwise_and(0xFFFF), 16);
  return (lo * c + high_part).bitwise_and(kMask32);
}

// lowbias32, as kernels/reference.py::mix32.
at::Tensor mix32(at::Tensor x) {
  x = x.bitwise_xor(at::bitwise_right_shift(x, 16));
  x = mul32(x, 0x7FEB352DLL);
  x = x.bitwise_xor(at::bitwise_right_shift(x, 15));
  x = mul32(x, 0x846CA68BLL);
  return x.bitwise_xor(at::bitwise_right_shift(x, 16));
}

// engine/reference.py::image_fingerprint.
at::Tensor image_fingerprint(const at::Tensor& x) {
  at::Tensor q = at::round(x.clamp(0.0, 1.0) * 65535.0).to(at::kLong).flatten(1);
  at::Tensor pos = mix32(at::arange(q.size(1), at::TensorOptions().dtype(at::kLong)));
  at::Tensor h = mix32(q.bitwise_xor(pos.unsqueeze(0)).bitwise_and(kMask32))
                     .sum(1)
                     .bitwise_and(kMask32);
  return mix32(h);
}

// kernels/reference.py::uniform_noise_ref: uniform in [-1, 1), shape (N, numel).
at::Tensor uniform_noise(uint32_t seed, const at::Tensor& ids, int64_t step, int64_t numel) {
  at::Tensor k = mix32(at::full_like(ids, (static_cast<int64_t>(seed) & kMask32) ^ kGolden));
  k = mix32(k.bitwise_xor(ids.bitwise_and(kMask32)));
  k = mix32((k + step).bitwise_and(kMask32)).unsqueeze(1);
  at::Tensor idx = at::arange(numel, at::TensorOptions().dtype(at::kLong)).unsqueeze(0);
  at::Tensor h = mix32(mix32(k.bitwise_xor(idx)));
  at::Tensor u = at::bitwise_right_shift(h, 8).to(at::kFloat) * (1.0 / 16777216.0);
  return 2.0 * u - 1.0;
}

struct Settings {
  double mu = 0, sigma = 0, lr = 2.0 / 255, noise_eps = 0.7 / 255, max_scale = 4.0;
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;
  int64_t steps = 13;
  uint32_t seed = 0;
  bool noise = true, clip = true;
  int64_t channels = 0, height = 0, width = 0;
};

// Reads a number that follows "key": in our own flat sidecar JSON.
double json_number(const std::string& text, const std::string& key) {
  size_t at = text.find("\"" + key + "\"");
  if (at == std::string::npos) throw std::runtime_error("sidecar has no field " + key);
  at = text.find(':', at);
  return std::stod(text.substr(at + 1));
}

struct Image {
  at::Tensor pixels;  // (C, H, W) float in [0, 1]
};

Image read_pnm(const fs::path& path, const Settings& s) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open file");
  std::string magic;
  int64_t w = 0, h = 0, maxval = 0;
  f >> magic;
  auto skip = [&f]() {
    f >> std::ws;
    while (f.peek() == '#') {
      std::string line;
      std::getline(f, line);
      f >> std::ws;
    }
  };
  skip();
  f >> w;
  skip();
  f >> h;
  skip();
  f >> maxval;
  if (!f || (magic != "P5" && magic != "P6")) throw std::runtime_error("not a binary PGM/PPM");
  int64_t c = magic == "P5" ? 1 : 3;
  if (maxval != 255) throw std::runtime_error("only 8-bit images (maxval 255) are supported");
  if (c != s.channels || h != s.height || w != s.width) {
    std::ostringstream msg;
    msg << "image is " << c << "x" << h << "x" << w << " but the model takes " << s.channels
        << "x" << s.height << "x" << s.width;
    throw std::runtime_error(msg.str());
  }
  f.get();  // the single whitespace byte before the raster
  std::vector<uint8_t> raster(static_cast<size_t>(c * h * w));
  f.read(reinterpret_cast<char*>(raster.data()), static_cast<std::streamsize>(raster.size()));
  if (f.gcount() != static_cast<std::streamsize>(raster.size()))
    throw std::runtime_error("truncated raster");
  at::Tensor hwc = torch::from_blob(raster.data(), {h, w, c}, at::kByte).clone();
  return {hwc.permute({2, 0, 1}).contiguous().to(at::kFloat) / 255.0};
}

void write_pnm(const fs::path& path, const at::Tensor& chw) {
  at::Tensor bytes = at::round(chw.clamp(0.0, 1.0) * 255.0).to(at::kByte).permute({1, 2, 0});
  bytes = bytes.contiguous();
  const int64_t c = chw.size(0), h = chw.size(1), w = chw.size(2);
  fs::path tmp = path;
  tmp += ".part";
  {
    std::ofstream f(tmp, std::ios::binary);
    f << (c == 1 ? "P5" : "P6") << "\n" << w << " " << h << "\n255\n";
    f.write(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), c * h * w);
    if (!f) throw std::runtime_error("cannot write " + path.string());
  }
  fs::rename(tmp, path);  // atomic: a kill never leaves half an image
}

// The adaptive loop of engine/reference.py::adaptive_purify around the compiled step graph.
at::Tensor purify(torch::inductor::AOTIModelPackageLoader& step, const at::Tensor& x,
                  const Settings& s, at::Tensor& error_before) {
  const int64_t n = x.size(0), numel = x[0].numel();
  at::Tensor ids = image_fingerprint(x);
  at::Tensor big_x = x.clone(), delta = at::zeros_like(x);
  at::Tensor m = at::zeros_like(x), v = at::zeros_like(x);
  for (int64_t t = 1; t <= s.steps; ++t) {
    at::Tensor y = big_x + delta;
    std::vector<at::Tensor> out = step.run({y});
    at::Tensor r = out[0], grad_r = out[1];
    if (t == 1) error_before = r.clone();
    if (s.noise) {
      at::Tensor z = (r - s.mu) / (2.0 * s.sigma);
      at::Tensor amp = s.noise_eps * (z * z).clamp(0.0, s.max_scale);
      at::Tensor u = uniform_noise(s.seed, ids, t, numel).view_as(x);
      big_x = big_x + amp.view({n, 1, 1, 1}) * u;
    }
    at::Tensor weight = 2.0 * (r - s.mu).clamp_min(0.0) / (s.sigma * s.sigma);
    at::Tensor g = weight.view({n, 1, 1, 1}) * grad_r;
    m = m * s.beta1 + g * (1.0 - s.beta1);
    v = v * s.beta2 + g * g * (1.0 - s.beta2);
    const double bias1 = 1.0 - std::pow(s.beta1, static_cast<double>(t));
    const double bias2 = 1.0 - std::pow(s.beta2, static_cast<double>(t));
    at::Tensor denom = v.sqrt() / std::sqrt(bias2) + s.adam_eps;
    delta = delta - (s.lr / bias1) * (m / denom);
  }
  at::Tensor result = big_x + delta;
  return s.clip ? result.clamp(0.0, 1.0) : result;
}

int usage(const char* msg) {
  std::cerr << "error: " << msg << "\n"
            << "usage: apudae-runner --package STEP.pt2 --meta STEP.json --out DIR [--seed S] "
               "[--steps T] [--lr X] [--noise-eps X] [--no-noise] [--no-clip] IMAGES...\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string package, meta, out_dir;
  Settings s;
  std::vector<fs::path> images;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
        return argv[++i];
      };
      if (a == "--package") package = value();
      else if (a == "--meta") meta = value();
      else if (a == "--out") out_dir = value();
      else if (a == "--seed") s.seed = static_cast<uint32_t>(std::stoul(value()));
      else if (a == "--steps") s.steps = std::stol(value());
      else if (a == "--lr") s.lr = std::stod(value());
      else if (a == "--noise-eps") s.noise_eps = std::stod(value());
      else if (a == "--no-noise") s.noise = false;
      else if (a == "--no-clip") s.clip = false;
      else if (a.rfind("--", 0) == 0) throw std::invalid_argument("unknown option " + a);
      else images.emplace_back(a);
    }
  } catch (const std::exception& e) {
    return usage(e.what());
  }
  if (package.empty() || meta.empty() || out_dir.empty()) return usage("--package, --meta and --out are required");
  if (images.empty()) return usage("no images given");
  try {
    std::ifstream mf(meta);
    if (!mf) throw std::runtime_error("cannot read sidecar " + meta);
    std::stringstream buf;
    buf << mf.rdbuf();
    const std::string text = buf.str();
    s.mu = json_number(text, "mu");
    s.sigma = json_number(text, "sigma");
    s.channels = static_cast<int64_t>(json_number(text, "channels"));
    s.height = static_cast<int64_t>(json_number(text, "height"));
    s.width = static_cast<int64_t>(json_number(text, "width"));
    if (!(s.sigma > 0)) throw std::runtime_error("sidecar has no calibration (sigma <= 0)");
  } catch (const std::exception& e) {
    std::cerr << "error: " << meta << ": " << e.what() << "\n";
    return 2;
  }
  torch::NoGradGuard no_grad;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> step;
  try {
    step = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package);
  } catch (const std::exception& e) {
    std::cerr << "error: " << package << ": cannot load the compiled step graph ("
              << std::string(e.what()).substr(0, 200) << ")\n";
    return 2;
  }
  fs::create_directories(out_dir);
  std::vector<at::Tensor> batch;
  std::vector<fs::path> names;
  int failed = 0;
  for (const fs::path& p : images) {
    try {
      batch.push_back(read_pnm(p, s).pixels);
      names.push_back(p);
    } catch (const std::exception& e) {
      std::cerr << "error: " << p.string() << ": " << e.what() << "\n";
      ++failed;
    }
  }
  if (!batch.empty()) {
    at::Tensor x = at::stack(batch);
    at::Tensor before;
    at::Tensor purified = purify(*step, x, s, before);
    at::Tensor after = step->run({purified})[0];
    for (size_t i = 0; i < names.size(); ++i) {
      fs::path target = fs::path(out_dir) / names[i].filename();
      write_pnm(target, purified[static_cast<int64_t>(i)]);
      std::cout << names[i].string() << "\t" << before[static_cast<int64_t>(i)].item<double>()
                << "\t" << after[static_cast<int64_t>(i)].item<double>() << "\n";
    }
  }
  return failed ? 1 : 0;
}
