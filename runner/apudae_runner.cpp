// apudae-runner: adaptive purification (APuDAE) of PNG/PGM/PPM images from C++.
//
// It loads the whole purification, exported and compiled ahead of time by AOTInductor
// (`apudae-engine export --whole --aoti`), and only decodes images, calls the package and
// writes the results. The package holds every step of the method (the DAE's input gradient,
// the counter-based noise, the hinge, Adam and the clip), so this file holds none of its maths
// and its outputs equal the Python reference to float rounding. Its inputs are the images,
// the image identities keying the noise (-1: the pixel fingerprint the Python API uses by
// default) and the seed (-1: the seed the graph was exported with).
//
// Usage:
//   apudae-runner --package WHOLE.aoti.pt2 --meta WHOLE.json --out DIR [--seed S]
//                 [--batch N] IMAGE.png|pgm|ppm ...
// Images must be 8-bit, at the model's input size, with its channels: PNG (grey or RGB; a
// palette is expanded, alpha dropped; needs libpng at build time), binary PGM (P5) or PPM
// (P6). Each purified image is written to DIR under its file name, in its input format. One
// line per image goes to stdout: path, r before, r after, active steps and flagged (0/1),
// tab-separated. Bad files get one error line on stderr and do not stop the others; the exit
// status is 1 when any file failed, 2 for a usage or model error.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#ifdef APUDAE_WITH_PNG
#include <png.h>
#endif

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

constexpr const char* kFormat = "apudae-engine/whole-purification";
constexpr const char* kOutputs[] = {"purified", "r_before", "r_after", "active_steps", "flagged"};

struct Model {
  int64_t channels = 0, height = 0, width = 0, max_batch = 0;
};

// Reads the number that follows "key": (after the first occurrence of `after`, if given) in
// our own flat sidecar JSON.
double json_number(const std::string& text, const std::string& key, const std::string& after = "") {
  size_t from = after.empty() ? 0 : text.find("\"" + after + "\"");
  if (from == std::string::npos) throw std::runtime_error("sidecar has no field " + after);
  size_t at = text.find("\"" + key + "\"", from);
  if (at == std::string::npos) throw std::runtime_error("sidecar has no field " + key);
  at = text.find(':', at);
  return std::stod(text.substr(at + 1));
}

Model read_sidecar(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot read the sidecar");
  std::stringstream buf;
  buf << f.rdbuf();
  const std::string text = buf.str();
  if (text.find(kFormat) == std::string::npos)
    throw std::runtime_error("not a whole-purification export; run `apudae-engine export "
                             "--whole --aoti`");
  for (const char* name : kOutputs)
    if (text.find(std::string("\"") + name + "\"") == std::string::npos)
      throw std::runtime_error(std::string("sidecar lists no output ") + name);
  Model m;
  m.channels = static_cast<int64_t>(json_number(text, "channels", "input"));
  m.height = static_cast<int64_t>(json_number(text, "height", "input"));
  m.width = static_cast<int64_t>(json_number(text, "width", "input"));
  m.max_batch = static_cast<int64_t>(json_number(text, "max", "batch"));
  return m;
}

enum class Kind { kPnm, kPng };

struct Image {
  at::Tensor pixels;  // (C, H, W) float in [0, 1]
  Kind kind;
};

void check_size(int64_t c, int64_t h, int64_t w, const Model& m) {
  if (c != m.channels || h != m.height || w != m.width) {
    std::ostringstream msg;
    msg << "image is " << c << "x" << h << "x" << w << " but the model takes " << m.channels
        << "x" << m.height << "x" << m.width;
    throw std::runtime_error(msg.str());
  }
}

at::Tensor to_chw(std::vector<uint8_t>& raster, int64_t c, int64_t h, int64_t w) {
  at::Tensor hwc = torch::from_blob(raster.data(), {h, w, c}, at::kByte).clone();
  return hwc.permute({2, 0, 1}).contiguous().to(at::kFloat) / 255.0;
}

at::Tensor to_hwc_bytes(const at::Tensor& chw) {
  return at::round(chw.clamp(0.0, 1.0) * 255.0).to(at::kByte).permute({1, 2, 0}).contiguous();
}

Image read_pnm(const fs::path& path, const Model& m) {
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
  check_size(c, h, w, m);
  f.get();  // the single whitespace byte before the raster
  std::vector<uint8_t> raster(static_cast<size_t>(c * h * w));
  f.read(reinterpret_cast<char*>(raster.data()), static_cast<std::streamsize>(raster.size()));
  if (f.gcount() != static_cast<std::streamsize>(raster.size()))
    throw std::runtime_error("truncated raster");
  return {to_chw(raster, c, h, w), Kind::kPnm};
}

#ifdef APUDAE_WITH_PNG
// libpng's simplified API: errors come back in image.message (no longjmp, no exceptions
// through C frames). Palettes are expanded and alpha is dropped (composited on black);
// grey to RGB is exact, RGB to grey is refused (its weights would differ from Pillow's).
Image read_png(const fs::path& path, const Model& m) {
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&image, path.c_str()))
    throw std::runtime_error(std::string("not a readable PNG (") + image.message + ")");
  const bool colour = (image.format & PNG_FORMAT_FLAG_COLOR) != 0;
  const int64_t c = colour ? 3 : m.channels;
  const int64_t h = image.height, w = image.width;
  if (colour && m.channels == 1) {
    png_image_free(&image);
    throw std::runtime_error("image is RGB but the model takes grey images");
  }
  try {
    check_size(c, h, w, m);
  } catch (...) {
    png_image_free(&image);
    throw;
  }
  image.format = c == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
  std::vector<uint8_t> raster(static_cast<size_t>(PNG_IMAGE_SIZE(image)));
  png_color black{0, 0, 0};
  if (!png_image_finish_read(&image, &black, raster.data(), 0, nullptr))
    throw std::runtime_error(std::string("cannot decode the PNG (") + image.message + ")");
  return {to_chw(raster, c, h, w), Kind::kPng};
}

void write_png_file(const fs::path& path, const at::Tensor& hwc) {
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(hwc.size(1));
  image.height = static_cast<png_uint_32>(hwc.size(0));
  image.format = hwc.size(2) == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
  if (!png_image_write_to_file(&image, path.c_str(), 0, hwc.data_ptr<uint8_t>(), 0, nullptr))
    throw std::runtime_error("cannot write " + path.string() + " (" + image.message + ")");
}
#endif

Image read_image(const fs::path& path, const Model& m) {
  std::string ext = path.extension().string();
  for (char& ch : ext) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (ext == ".png") {
#ifdef APUDAE_WITH_PNG
    return read_png(path, m);
#else
    throw std::runtime_error("this runner was built without libpng; install libpng-dev and "
                             "rebuild, or convert the image to PGM/PPM");
#endif
  }
  return read_pnm(path, m);
}

void write_image(const fs::path& path, const at::Tensor& chw, Kind kind) {
  at::Tensor hwc = to_hwc_bytes(chw);
  fs::path tmp = path;
  tmp += ".part";
#ifdef APUDAE_WITH_PNG
  if (kind == Kind::kPng) {
    write_png_file(tmp, hwc);
    fs::rename(tmp, path);  // atomic: a kill never leaves half an image
    return;
  }
#endif
  (void)kind;
  const int64_t h = hwc.size(0), w = hwc.size(1), c = hwc.size(2);
  {
    std::ofstream f(tmp, std::ios::binary);
    f << (c == 1 ? "P5" : "P6") << "\n" << w << " " << h << "\n255\n";
    f.write(reinterpret_cast<const char*>(hwc.data_ptr<uint8_t>()), c * h * w);
    if (!f) throw std::runtime_error("cannot write " + path.string());
  }
  fs::rename(tmp, path);
}

int usage(const char* msg) {
  std::cerr << "error: " << msg << "\n"
            << "usage: apudae-runner --package WHOLE.aoti.pt2 --meta WHOLE.json --out DIR "
               "[--seed S] [--batch N] IMAGES...\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string package, meta, out_dir;
  int64_t seed = -1, batch_size = 64;
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
      else if (a == "--seed") seed = static_cast<int64_t>(std::stoul(value()) & 0xFFFFFFFFUL);
      else if (a == "--batch") batch_size = std::stol(value());
      else if (a.rfind("--", 0) == 0) throw std::invalid_argument("unknown option " + a);
      else images.emplace_back(a);
    }
  } catch (const std::exception& e) {
    return usage(e.what());
  }
  if (package.empty() || meta.empty() || out_dir.empty())
    return usage("--package, --meta and --out are required");
  if (images.empty()) return usage("no images given");
  if (batch_size < 1) return usage("--batch must be at least 1");
  Model model;
  try {
    model = read_sidecar(meta);
  } catch (const std::exception& e) {
    std::cerr << "error: " << meta << ": " << e.what() << "\n";
    return 2;
  }
  batch_size = std::min(batch_size, model.max_batch);
  torch::NoGradGuard no_grad;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> purify;
  try {
    purify = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package);
  } catch (const std::exception& e) {
    std::cerr << "error: " << package << ": cannot load the compiled purification ("
              << std::string(e.what()).substr(0, 200) << ")\n";
    return 2;
  }
  fs::create_directories(out_dir);
  std::vector<Image> batch;
  std::vector<fs::path> names;
  int failed = 0;
  auto flush = [&]() {
    if (batch.empty()) return;
    std::vector<at::Tensor> pixels;
    for (const Image& im : batch) pixels.push_back(im.pixels);
    at::Tensor x = at::stack(pixels);
    at::Tensor ids = at::full({x.size(0)}, -1, at::TensorOptions().dtype(at::kLong));
    at::Tensor s = at::scalar_tensor(seed, at::TensorOptions().dtype(at::kLong));
    std::vector<at::Tensor> out = purify->run({x, ids, s});
    at::Tensor before = out[1], after = out[2], active = out[3], flagged = out[4];
    for (size_t i = 0; i < names.size(); ++i) {
      const int64_t k = static_cast<int64_t>(i);
      write_image(fs::path(out_dir) / names[i].filename(), out[0][k], batch[i].kind);
      std::cout << names[i].string() << "\t" << before[k].item<double>() << "\t"
                << after[k].item<double>() << "\t" << active[k].item<int64_t>() << "\t"
                << static_cast<int>(flagged[k].item<bool>()) << "\n";
    }
    batch.clear();
    names.clear();
  };
  for (const fs::path& p : images) {
    try {
      batch.push_back(read_image(p, model));
      names.push_back(p);
    } catch (const std::exception& e) {
      std::cerr << "error: " << p.string() << ": " << e.what() << "\n";
      ++failed;
    }
    if (static_cast<int64_t>(batch.size()) == batch_size) flush();
  }
  flush();
  return failed ? 1 : 0;
}
