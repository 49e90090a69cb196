// serving_check: runs one signature of a SavedModel through TensorFlow's C++
// loader, the loader TF Serving uses, with no Python involved.
//
// Usage:
//   serving_check --saved_model_dir=DIR --images=FILE --shape=N,H,W,C
//       [--signature=serving_default] [--input=images]
//       [--radii=FILE --radius_input=radius]
//       [--outputs=class,radius,p_lower] [--warmup=0] [--repeat=1]
//   serving_check --saved_model_dir=DIR --signature=metadata
//   serving_check --load --saved_model_dir=DIR --images=FILE --shape=N,H,W,C
//       [--threads=1] [--requests=10] [--seconds=60] [--warmup=1]
//       [--signatures=serving_default,certify_radius,predict]
//       [--batch_sizes=1] [--seed=0] [--max_radius=2*sigma]
//       [--sample_seconds=1]
//
// FILE holds N*H*W*C little-endian float32 values in C order (numpy's
// `array.astype("<f4").tofile(FILE)`). --radii gives a second float32 input
// of shape [N], one value per image (certify_radius's `radius`), fed to the
// input --radius_input. Tensor names are read from the signature's
// SignatureDef, never assumed. Boolean outputs print as true/false.
//
// Output (stdout), one line per image, tab-separated:
//   <index>\t<output 1>\t<output 2>...   in the order given by --outputs.
// Without --images the signature is run with no inputs and every output is
// printed as `<key>\t<values joined by ,>` (used for the `metadata`
// signature). With --warmup=W --repeat=R the request is sent W untimed times
// (as TF Serving's warm-up does), then R timed times, and one line
// `timing\trequests=R\tseconds_per_request=S` goes to stderr; the printed
// outputs are those of the last request. Errors: one line on stderr, exit 1.
//
// Load mode (--load): T = --threads threads send up to R = --requests
// requests each, until --seconds have passed, to ONE loaded
// SavedModelBundle, the way TF Serving shares one loaded model between
// concurrent requests. Everything runs in this process (Session::Run calls):
// no network port is opened. Each request draws, from a generator seeded by
// (--seed, thread), a signature of --signatures, a batch size of
// --batch_sizes, that many images of the pool FILE (N images) and, for
// certify_radius, one radius per image uniform in (0, --max_radius]. Before
// the timed run every (signature, batch size) is sent --warmup times from
// every thread at once, so that the allocator has seen the concurrent peak.
// Every answer is checked against the signature's contract, with
// num_classes, stages and sigma read from the `metadata` signature: one
// value per image of the output's dtype; class in [-1, num_classes); radius
// finite, >= 0 and 0 on abstain; serving_default's p_lower in [0, 1] and
// >= 1/2 exactly when a class is certified; certify_radius certifies exactly
// when its radius reaches the one asked, never on abstain; samples one of
// the stages, and predict abstains only at the last. (The Python path,
// tf_consreg.serving_load, checks with serving_client.check_answer, which
// also bounds serving_default's radius by sigma Phi^-1(p_lower).)
// stdout gets one JSON line: requests, images, requests_per_second,
// images_per_second, latency_ms (count, p50, p95, p99, max) per signature,
// per batch size and overall, rss_kb after warm-up and at the end,
// peak_rss_kb (VmHWM of /proc/self/status, reset after the model loaded when
// /proc/self/clear_refs allows), a timeline sampled every --sample_seconds
// (t, rss_kb, requests done, p50/p99 of the requests ending in the
// interval), errors (failed requests) and wrong_answers, warm-up included
// (warmup_failures counts those of the warm-up), and the first message of
// each. The exit status is 0 whatever the answers: read the counts.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/framework/types.h"
#include "tensorflow/core/protobuf/meta_graph.pb.h"
#include "tensorflow/core/public/session_options.h"

namespace {

struct Args {
  std::string saved_model_dir;
  std::string images;
  std::string signature = "serving_default";
  std::string input = "images";
  std::string radii;
  std::string radius_input = "radius";
  std::string outputs = "class,radius,p_lower";
  std::vector<int64_t> shape;
  int warmup = 0;
  int repeat = 1;
  bool warmup_given = false;
  // Load mode.
  bool load = false;
  int threads = 1;
  int requests = 10;
  double seconds = 60.0;
  std::vector<std::string> signatures = {"serving_default", "certify_radius",
                                         "predict"};
  std::vector<int64_t> batch_sizes = {1};
  uint64_t seed = 0;
  double max_radius = 0.0;  // 0: 2 sigma.
  double sample_seconds = 1.0;
};

[[noreturn]] void Fail(const std::string& message) {
  std::fprintf(stderr, "serving_check: error: %s\n", message.c_str());
  std::exit(1);
}

std::vector<std::string> Split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, sep)) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

// Parses --`flag`'s `value` as a number > 0 (an integer if `integer`).
double Positive(const std::string& flag, const std::string& value,
                bool integer) {
  char* end = nullptr;
  const double number = std::strtod(value.c_str(), &end);
  if (value.empty() || *end != '\0' || !std::isfinite(number) ||
      number <= 0 || (integer && number != std::floor(number))) {
    Fail("--" + flag + ": expected " +
         (integer ? "an integer >= 1" : "a number > 0") + ", got '" + value +
         "'");
  }
  return number;
}

Args ParseArgs(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--load") {
      args.load = true;
      continue;
    }
    const size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) {
      Fail("expected --name=value, got '" + arg + "'");
    }
    const std::string name = arg.substr(2, eq - 2);
    const std::string value = arg.substr(eq + 1);
    if (name == "saved_model_dir") {
      args.saved_model_dir = value;
    } else if (name == "images") {
      args.images = value;
    } else if (name == "signature") {
      args.signature = value;
    } else if (name == "input") {
      args.input = value;
    } else if (name == "radii") {
      args.radii = value;
    } else if (name == "radius_input") {
      args.radius_input = value;
    } else if (name == "outputs") {
      args.outputs = value;
    } else if (name == "warmup") {
      args.warmup = std::atoi(value.c_str());
      if (args.warmup < 0) Fail("--warmup must be >= 0");
      args.warmup_given = true;
    } else if (name == "repeat") {
      args.repeat = std::atoi(value.c_str());
      if (args.repeat < 1) Fail("--repeat must be >= 1");
    } else if (name == "shape") {
      for (const std::string& dim : Split(value, ',')) {
        char* end = nullptr;
        const long long size = std::strtoll(dim.c_str(), &end, 10);
        if (*end != '\0' || size < 1) Fail("--shape: bad dimension '" + dim + "'");
        args.shape.push_back(size);
      }
    } else if (name == "load") {
      if (value != "true" && value != "false") Fail("--load: expected true or false");
      args.load = value == "true";
    } else if (name == "threads") {
      args.threads = static_cast<int>(Positive(name, value, true));
    } else if (name == "requests") {
      args.requests = static_cast<int>(Positive(name, value, true));
    } else if (name == "seconds") {
      args.seconds = Positive(name, value, false);
    } else if (name == "sample_seconds") {
      args.sample_seconds = Positive(name, value, false);
    } else if (name == "max_radius") {
      args.max_radius = Positive(name, value, false);
    } else if (name == "seed") {
      char* end = nullptr;
      args.seed = std::strtoull(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0') Fail("--seed: expected an integer >= 0");
    } else if (name == "signatures") {
      args.signatures = Split(value, ',');
      if (args.signatures.empty()) Fail("--signatures: give at least one");
    } else if (name == "batch_sizes") {
      args.batch_sizes.clear();
      for (const std::string& size : Split(value, ',')) {
        args.batch_sizes.push_back(
            static_cast<int64_t>(Positive(name, size, true)));
      }
      if (args.batch_sizes.empty()) Fail("--batch_sizes: give at least one");
    } else {
      Fail("unknown flag --" + name);
    }
  }
  if (args.load && (args.images.empty() || args.shape.size() != 4)) {
    Fail("--load needs --images and --shape=N,H,W,C (the pool of images)");
  }
  if (args.load && !args.warmup_given) args.warmup = 1;
  if (args.saved_model_dir.empty()) Fail("--saved_model_dir is required");
  if (!args.images.empty() && args.shape.empty()) {
    Fail("--shape=N,H,W,C is required with --images");
  }
  if (!args.radii.empty() && args.images.empty()) {
    Fail("--radii needs --images and --shape");
  }
  return args;
}

// Reads a float32 tensor of `dims` from `path`, the value of --`flag`.
tensorflow::Tensor ReadFloats(const std::string& path,
                              const std::vector<int64_t>& dims,
                              const std::string& flag) {
  tensorflow::TensorShape shape;
  for (int64_t dim : dims) shape.AddDim(dim);
  tensorflow::Tensor tensor(tensorflow::DT_FLOAT, shape);
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) Fail("--" + flag + ": cannot open " + path);
  const std::streamsize size = file.tellg();
  const std::streamsize expected =
      static_cast<std::streamsize>(tensor.NumElements() * sizeof(float));
  if (size != expected) {
    Fail("--" + flag + ": " + path + " has " + std::to_string(size) +
         " bytes but --shape needs " + std::to_string(expected));
  }
  file.seekg(0);
  file.read(reinterpret_cast<char*>(tensor.flat<float>().data()), size);
  return tensor;
}

// Formats element `i` of a rank-1 (or scalar, i = 0) tensor.
std::string Element(const tensorflow::Tensor& t, int64_t i) {
  char buffer[64];
  switch (t.dtype()) {
    case tensorflow::DT_FLOAT:
      std::snprintf(buffer, sizeof(buffer), "%.9g", t.flat<float>()(i));
      return buffer;
    case tensorflow::DT_DOUBLE:
      std::snprintf(buffer, sizeof(buffer), "%.17g", t.flat<double>()(i));
      return buffer;
    case tensorflow::DT_INT64:
      return std::to_string(t.flat<int64_t>()(i));
    case tensorflow::DT_INT32:
      return std::to_string(t.flat<int32_t>()(i));
    case tensorflow::DT_BOOL:
      return t.flat<bool>()(i) ? "true" : "false";
    case tensorflow::DT_STRING:
      return std::string(t.flat<tensorflow::tstring>()(i));
    default:
      Fail(std::string("unsupported output dtype ") +
           tensorflow::DataTypeString(t.dtype()));
  }
}

std::string Joined(const tensorflow::Tensor& t) {
  std::string text;
  for (int64_t i = 0; i < t.NumElements(); ++i) {
    if (i > 0) text += ",";
    text += Element(t, i);
  }
  return text;
}

// ---------------------------------------------------------------- load mode

// kB of VmRSS or VmHWM in /proc/self/status; -1 when unreadable.
int64_t StatusKb(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(field + ":", 0) == 0) {
      return std::strtoll(line.c_str() + field.size() + 1, nullptr, 10);
    }
  }
  return -1;
}

// Resets VmHWM to the current RSS (Linux >= 4.0); false when not allowed.
bool ResetPeakRss() {
  std::ofstream clear("/proc/self/clear_refs");
  if (!clear) return false;
  clear << "5";
  clear.flush();
  return static_cast<bool>(clear);
}

// What the `metadata` signature says the answers must satisfy.
struct Contract {
  int64_t num_classes = 0;
  std::vector<int64_t> stages;
  double sigma = 0.0;
};

double AsDouble(const tensorflow::Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case tensorflow::DT_FLOAT:
      return t.flat<float>()(i);
    case tensorflow::DT_DOUBLE:
      return t.flat<double>()(i);
    case tensorflow::DT_INT64:
      return static_cast<double>(t.flat<int64_t>()(i));
    case tensorflow::DT_INT32:
      return t.flat<int32_t>()(i);
    default:
      Fail(std::string("metadata: a number is ") +
           tensorflow::DataTypeString(t.dtype()));
  }
}

Contract ReadContract(const tensorflow::SavedModelBundle& bundle,
                      const std::string& dir) {
  const auto& signatures = bundle.meta_graph_def.signature_def();
  const auto found = signatures.find("metadata");
  if (found == signatures.end()) {
    Fail("--load: no signature 'metadata' in " + dir +
         "; is it an export of tf_consreg's export_smoothed?");
  }
  std::vector<std::string> fetches;
  const std::vector<std::string> keys = {"num_classes", "stages", "sigma"};
  for (const std::string& key : keys) {
    const auto output = found->second.outputs().find(key);
    if (output == found->second.outputs().end()) {
      Fail("--load: the metadata of " + dir + " lacks " + key);
    }
    fetches.push_back(output->second.name());
  }
  std::vector<tensorflow::Tensor> values;
  const absl::Status status = bundle.session->Run({}, fetches, {}, &values);
  if (!status.ok()) {
    Fail("signature 'metadata' failed: " + std::string(status.message()));
  }
  Contract contract;
  contract.num_classes = static_cast<int64_t>(AsDouble(values[0], 0));
  for (int64_t i = 0; i < values[1].NumElements(); ++i) {
    contract.stages.push_back(static_cast<int64_t>(AsDouble(values[1], i)));
  }
  contract.sigma = AsDouble(values[2], 0);
  if (contract.num_classes < 2 || contract.stages.empty() ||
      !(contract.sigma > 0)) {
    Fail("--load: the metadata of " + dir +
         " has num_classes < 2, no stages or sigma <= 0");
  }
  return contract;
}

// The outputs each signature must have, with their dtypes.
const std::map<std::string, std::vector<std::pair<std::string,
                                                  tensorflow::DataType>>>&
SignatureOutputs() {
  static const auto* outputs = new std::map<
      std::string,
      std::vector<std::pair<std::string, tensorflow::DataType>>>{
      {"serving_default",
       {{"class", tensorflow::DT_INT64},
        {"radius", tensorflow::DT_FLOAT},
        {"p_lower", tensorflow::DT_FLOAT}}},
      {"certify_radius",
       {{"class", tensorflow::DT_INT64},
        {"certified", tensorflow::DT_BOOL},
        {"radius", tensorflow::DT_FLOAT},
        {"samples", tensorflow::DT_INT64}}},
      {"predict",
       {{"class", tensorflow::DT_INT64}, {"samples", tensorflow::DT_INT64}}},
  };
  return *outputs;
}

// One signature ready to run: feed and fetch names from its SignatureDef.
struct Endpoint {
  std::string name;
  std::string images_feed;
  std::string radius_feed;  // Empty unless certify_radius.
  std::vector<std::string> keys;
  std::vector<tensorflow::DataType> dtypes;
  std::vector<std::string> fetches;
};

Endpoint MakeEndpoint(const tensorflow::SavedModelBundle& bundle,
                      const std::string& name) {
  const auto known = SignatureOutputs().find(name);
  if (known == SignatureOutputs().end()) {
    Fail("--signatures: '" + name +
         "' is not one of serving_default, certify_radius, predict");
  }
  const auto& signatures = bundle.meta_graph_def.signature_def();
  const auto found = signatures.find(name);
  if (found == signatures.end()) Fail("no signature '" + name + "'");
  const tensorflow::SignatureDef& signature = found->second;
  Endpoint endpoint;
  endpoint.name = name;
  const auto images = signature.inputs().find("images");
  if (images == signature.inputs().end()) {
    Fail("signature '" + name + "' has no input 'images'");
  }
  endpoint.images_feed = images->second.name();
  if (name == "certify_radius") {
    const auto radius = signature.inputs().find("radius");
    if (radius == signature.inputs().end()) {
      Fail("signature '" + name + "' has no input 'radius'");
    }
    endpoint.radius_feed = radius->second.name();
  }
  for (const auto& [key, dtype] : known->second) {
    const auto output = signature.outputs().find(key);
    if (output == signature.outputs().end()) {
      Fail("signature '" + name + "' has no output '" + key + "'");
    }
    endpoint.keys.push_back(key);
    endpoint.dtypes.push_back(dtype);
    endpoint.fetches.push_back(output->second.name());
  }
  return endpoint;
}

// The first way an answer breaks its signature's contract, or "" if none.
std::string CheckAnswer(const Endpoint& endpoint, const Contract& contract,
                        const std::vector<tensorflow::Tensor>& results,
                        int64_t batch, const std::vector<float>& asked) {
  std::map<std::string, const tensorflow::Tensor*> out;
  for (size_t k = 0; k < endpoint.keys.size(); ++k) {
    const tensorflow::Tensor& t = results[k];
    if (t.dtype() != endpoint.dtypes[k] || t.dims() != 1 ||
        t.dim_size(0) != batch) {
      return endpoint.keys[k] + " is " +
             tensorflow::DataTypeString(t.dtype()) + " " +
             t.shape().DebugString() + ", expected " +
             tensorflow::DataTypeString(endpoint.dtypes[k]) + " [" +
             std::to_string(batch) + "]";
    }
    out[endpoint.keys[k]] = &t;
  }
  const auto row = [](const std::string& key, int64_t i) {
    return key + "[" + std::to_string(i) + "] = ";
  };
  const auto is_stage = [&](int64_t samples) {
    return std::find(contract.stages.begin(), contract.stages.end(),
                     samples) != contract.stages.end();
  };
  const auto classes = out["class"]->flat<int64_t>();
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t c = classes(i);
    const bool abstains = c == -1;
    if (c < -1 || c >= contract.num_classes) {
      return row("class", i) + std::to_string(c) + " is not a class of " +
             std::to_string(contract.num_classes) + " nor -1";
    }
    if (out.count("radius")) {
      const float r = out["radius"]->flat<float>()(i);
      if (!std::isfinite(r) || r < 0) {
        return row("radius", i) + std::to_string(r) + " is not finite >= 0";
      }
      if (abstains && r != 0) {
        return row("radius", i) + std::to_string(r) +
               " is not 0 though class is -1";
      }
    }
    if (out.count("p_lower")) {
      const float p = out["p_lower"]->flat<float>()(i);
      // Certified exactly when the float64 bound is >= 1/2; float32
      // rounding keeps the order, except that a bound just below 1/2 may
      // round to 1/2.
      if (!(p >= 0 && p <= 1) || (!abstains && p < 0.5f) ||
          (abstains && p > 0.5f)) {
        return row("p_lower", i) + std::to_string(p) +
               " disagrees with class " + std::to_string(c);
      }
    }
    if (out.count("certified")) {
      const bool certified = out["certified"]->flat<bool>()(i);
      const float r = out["radius"]->flat<float>()(i);
      // Certified exactly when the float64 radius is >= the float32 radius
      // asked; rounding the radius to float32 keeps that order.
      if ((certified && (abstains || r < asked[i])) ||
          (!certified && r > asked[i])) {
        return row("certified", i) + (certified ? "true" : "false") +
               " disagrees with radius " + std::to_string(r) +
               " asked " + std::to_string(asked[i]) + ", class " +
               std::to_string(c);
      }
    }
    if (out.count("samples")) {
      const int64_t samples = out["samples"]->flat<int64_t>()(i);
      if (!is_stage(samples)) {
        return row("samples", i) + std::to_string(samples) +
               " is not one of the stages";
      }
      if (endpoint.name == "predict" && abstains &&
          samples != contract.stages.back()) {
        return row("samples", i) + std::to_string(samples) +
               " is not the last stage though predict abstained";
      }
    }
  }
  return "";
}

struct Record {
  double end;      // Seconds since the timed run started.
  double latency;  // Seconds.
  size_t signature;
  size_t batch;  // Index into --batch_sizes.
};

// Shared by the request threads.
struct Tally {
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> errors{0};
  std::atomic<int64_t> wrong{0};
  std::mutex mutex;
  std::string first_error;
  std::string first_wrong;

  void Note(std::atomic<int64_t>& count, std::string& first,
            const std::string& message) {
    if (count.fetch_add(1) == 0) {
      std::lock_guard<std::mutex> lock(mutex);
      first = message;
    }
  }
};

std::string JsonString(const std::string& text) {
  std::string quoted = "\"";
  for (const char ch : text) {
    if (ch == '"' || ch == '\\') {
      quoted += '\\';
      quoted += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buffer[8];
      std::snprintf(buffer, sizeof(buffer), "\\u%04x", ch);
      quoted += buffer;
    } else {
      quoted += ch;
    }
  }
  return quoted + "\"";
}

std::string Number(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.6g", value);
  return buffer;
}

// Nearest-rank percentile q in (0, 100] of sorted `values`.
double Percentile(const std::vector<double>& sorted, double q) {
  const size_t rank = static_cast<size_t>(
      std::ceil(q / 100.0 * static_cast<double>(sorted.size())));
  return sorted[std::max<size_t>(rank, 1) - 1];
}

// {"count":...,"p50":...,"p95":...,"p99":...,"max":...} in milliseconds.
std::string LatencyJson(std::vector<double> seconds) {
  if (seconds.empty()) return "{\"count\":0}";
  std::sort(seconds.begin(), seconds.end());
  return "{\"count\":" + std::to_string(seconds.size()) +
         ",\"p50\":" + Number(1000 * Percentile(seconds, 50)) +
         ",\"p95\":" + Number(1000 * Percentile(seconds, 95)) +
         ",\"p99\":" + Number(1000 * Percentile(seconds, 99)) +
         ",\"max\":" + Number(1000 * seconds.back()) + "}";
}

int RunLoad(const Args& args, const tensorflow::SavedModelBundle& bundle) {
  const Contract contract = ReadContract(bundle, args.saved_model_dir);
  std::vector<Endpoint> endpoints;
  for (const std::string& name : args.signatures) {
    endpoints.push_back(MakeEndpoint(bundle, name));
  }
  const tensorflow::Tensor pool = ReadFloats(args.images, args.shape, "images");
  const int64_t pool_size = args.shape[0];
  const int64_t image_size = pool.NumElements() / pool_size;
  const double max_radius =
      args.max_radius > 0 ? args.max_radius : 2 * contract.sigma;
  const bool peak_reset = ResetPeakRss();

  Tally tally;
  using Clock = std::chrono::steady_clock;
  Clock::time_point start = Clock::now();
  // One request of signature `s` and batch size index `b`, images and radii
  // drawn from `rng`; returns its latency in seconds.
  const auto request = [&](std::mt19937_64& rng, size_t s, size_t b) {
    const Endpoint& endpoint = endpoints[s];
    const int64_t batch = args.batch_sizes[b];
    tensorflow::Tensor images(
        tensorflow::DT_FLOAT,
        tensorflow::TensorShape(
            {batch, args.shape[1], args.shape[2], args.shape[3]}));
    std::uniform_int_distribution<int64_t> pick(0, pool_size - 1);
    for (int64_t i = 0; i < batch; ++i) {
      std::copy_n(pool.flat<float>().data() + pick(rng) * image_size,
                  image_size, images.flat<float>().data() + i * image_size);
    }
    std::vector<std::pair<std::string, tensorflow::Tensor>> feeds = {
        {endpoint.images_feed, images}};
    std::vector<float> asked;
    if (!endpoint.radius_feed.empty()) {
      // (0, max_radius]: 1 - U with U uniform in [0, 1).
      std::uniform_real_distribution<double> unit(0.0, 1.0);
      tensorflow::Tensor radii(tensorflow::DT_FLOAT,
                               tensorflow::TensorShape({batch}));
      for (int64_t i = 0; i < batch; ++i) {
        asked.push_back(static_cast<float>((1.0 - unit(rng)) * max_radius));
        radii.flat<float>()(i) = asked.back();
      }
      feeds.emplace_back(endpoint.radius_feed, radii);
    }
    std::vector<tensorflow::Tensor> results;
    const Clock::time_point begin = Clock::now();
    const absl::Status status =
        bundle.session->Run(feeds, endpoint.fetches, {}, &results);
    const std::chrono::duration<double> latency = Clock::now() - begin;
    if (!status.ok()) {
      tally.Note(tally.errors, tally.first_error,
                 endpoint.name + ": " + std::string(status.message()));
    } else {
      const std::string wrong =
          CheckAnswer(endpoint, contract, results, batch, asked);
      if (!wrong.empty()) {
        tally.Note(tally.wrong, tally.first_wrong,
                   endpoint.name + " (batch " + std::to_string(batch) +
                       "): " + wrong);
      }
    }
    return latency.count();
  };

  // Warm-up: every (signature, batch size) from every thread at once.
  {
    std::vector<std::thread> threads;
    for (int t = 0; t < args.threads; ++t) {
      threads.emplace_back([&, t]() {
        std::mt19937_64 rng(args.seed * 1000003 + 7919 + t);
        for (int w = 0; w < args.warmup; ++w) {
          for (size_t s = 0; s < endpoints.size(); ++s) {
            for (size_t b = 0; b < args.batch_sizes.size(); ++b) {
              request(rng, s, b);
            }
          }
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
  }
  const int64_t warmup_errors = tally.errors.load() + tally.wrong.load();
  const int64_t rss_after_warmup = StatusKb("VmRSS");

  // The timed run, with a thread that samples RSS every --sample_seconds.
  std::vector<std::vector<Record>> records(args.threads);
  std::vector<std::pair<double, int64_t>> rss_samples;  // (t, kB)
  std::vector<int64_t> done_samples;
  std::atomic<int> running{args.threads};
  start = Clock::now();
  const auto elapsed = [&]() {
    return std::chrono::duration<double>(Clock::now() - start).count();
  };
  std::thread sampler([&]() {
    rss_samples.emplace_back(0.0, rss_after_warmup);
    done_samples.push_back(0);
    double next = args.sample_seconds;
    while (running.load() > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (elapsed() >= next) {
        rss_samples.emplace_back(elapsed(), StatusKb("VmRSS"));
        done_samples.push_back(tally.done.load());
        next += args.sample_seconds;
      }
    }
    rss_samples.emplace_back(elapsed(), StatusKb("VmRSS"));
    done_samples.push_back(tally.done.load());
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < args.threads; ++t) {
    threads.emplace_back([&, t]() {
      std::mt19937_64 rng(args.seed * 1000003 + t);
      std::uniform_int_distribution<size_t> signature(0, endpoints.size() - 1);
      std::uniform_int_distribution<size_t> batch(
          0, args.batch_sizes.size() - 1);
      for (int r = 0; r < args.requests && elapsed() < args.seconds; ++r) {
        const size_t s = signature(rng);
        const size_t b = batch(rng);
        const double latency = request(rng, s, b);
        records[t].push_back({elapsed(), latency, s, b});
        tally.done.fetch_add(1);
      }
      running.fetch_sub(1);
    });
  }
  for (std::thread& thread : threads) thread.join();
  const double wall = elapsed();
  sampler.join();

  std::vector<Record> all;
  for (const auto& part : records) all.insert(all.end(), part.begin(), part.end());
  int64_t images = 0;
  std::vector<double> overall;
  std::vector<std::vector<double>> by_signature(endpoints.size());
  std::vector<std::vector<double>> by_batch(args.batch_sizes.size());
  for (const Record& record : all) {
    images += args.batch_sizes[record.batch];
    overall.push_back(record.latency);
    by_signature[record.signature].push_back(record.latency);
    by_batch[record.batch].push_back(record.latency);
  }
  std::string json = "{\"path\":\"c++\",\"threads\":" +
                     std::to_string(args.threads) +
                     ",\"requests\":" + std::to_string(all.size()) +
                     ",\"images\":" + std::to_string(images) +
                     ",\"seconds\":" + Number(wall) +
                     ",\"requests_per_second\":" + Number(all.size() / wall) +
                     ",\"images_per_second\":" + Number(images / wall) +
                     ",\"latency_ms\":{\"all\":" + LatencyJson(overall);
  for (size_t s = 0; s < endpoints.size(); ++s) {
    json += "," + JsonString(endpoints[s].name) + ":" +
            LatencyJson(by_signature[s]);
  }
  json += "},\"latency_ms_by_batch\":{";
  for (size_t b = 0; b < args.batch_sizes.size(); ++b) {
    json += (b ? ",\"" : "\"") + std::to_string(args.batch_sizes[b]) +
            "\":" + LatencyJson(by_batch[b]);
  }
  json += "},\"rss_kb_after_warmup\":" + std::to_string(rss_after_warmup) +
          ",\"rss_kb_end\":" + std::to_string(rss_samples.back().second) +
          ",\"peak_rss_kb\":" + std::to_string(StatusKb("VmHWM")) +
          ",\"peak_rss_since\":" +
          JsonString(peak_reset ? "model loaded" : "process start") +
          ",\"timeline\":[";
  for (size_t i = 0; i < rss_samples.size(); ++i) {
    const double from = i ? rss_samples[i - 1].first : -1.0;
    std::vector<double> window;
    for (const Record& record : all) {
      if (record.end > from && record.end <= rss_samples[i].first) {
        window.push_back(record.latency);
      }
    }
    std::sort(window.begin(), window.end());
    json += std::string(i ? "," : "") + "{\"t\":" +
            Number(rss_samples[i].first) +
            ",\"rss_kb\":" + std::to_string(rss_samples[i].second) +
            ",\"requests\":" + std::to_string(done_samples[i]);
    if (!window.empty()) {
      json += ",\"p50_ms\":" + Number(1000 * Percentile(window, 50)) +
              ",\"p99_ms\":" + Number(1000 * Percentile(window, 99));
    }
    json += "}";
  }
  json += "],\"errors\":" + std::to_string(tally.errors.load()) +
          ",\"wrong_answers\":" + std::to_string(tally.wrong.load()) +
          ",\"warmup_failures\":" + std::to_string(warmup_errors) +
          ",\"first_error\":" + JsonString(tally.first_error) +
          ",\"first_wrong_answer\":" + JsonString(tally.first_wrong) + "}";
  std::printf("%s\n", json.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = ParseArgs(argc, argv);

  tensorflow::SavedModelBundle bundle;
  const absl::Status load_status = tensorflow::LoadSavedModel(
      tensorflow::SessionOptions(), tensorflow::RunOptions(),
      args.saved_model_dir, {"serve"}, &bundle);
  if (!load_status.ok()) {
    Fail("cannot load " + args.saved_model_dir + ": " +
         std::string(load_status.message()));
  }
  if (args.load) return RunLoad(args, bundle);

  const auto& signatures = bundle.meta_graph_def.signature_def();
  const auto found = signatures.find(args.signature);
  if (found == signatures.end()) {
    Fail("no signature '" + args.signature + "' in " + args.saved_model_dir);
  }
  const tensorflow::SignatureDef& signature = found->second;

  std::vector<std::pair<std::string, tensorflow::Tensor>> feeds;
  std::vector<std::string> keys;
  if (!args.images.empty()) {
    const auto input = signature.inputs().find(args.input);
    if (input == signature.inputs().end()) {
      Fail("signature '" + args.signature + "' has no input '" + args.input + "'");
    }
    feeds.emplace_back(input->second.name(),
                       ReadFloats(args.images, args.shape, "images"));
    if (!args.radii.empty()) {
      const auto radius = signature.inputs().find(args.radius_input);
      if (radius == signature.inputs().end()) {
        Fail("signature '" + args.signature + "' has no input '" +
             args.radius_input + "'");
      }
      feeds.emplace_back(radius->second.name(),
                         ReadFloats(args.radii, {args.shape[0]}, "radii"));
    }
    keys = Split(args.outputs, ',');
  } else {
    if (!signature.inputs().empty()) {
      Fail("signature '" + args.signature + "' needs --images and --shape");
    }
    for (const auto& output : signature.outputs()) keys.push_back(output.first);
    std::sort(keys.begin(), keys.end());  // Map order is unspecified.
  }
  std::vector<std::string> fetches;
  for (const std::string& key : keys) {
    const auto output = signature.outputs().find(key);
    if (output == signature.outputs().end()) {
      Fail("signature '" + args.signature + "' has no output '" + key + "'");
    }
    fetches.push_back(output->second.name());
  }

  std::vector<tensorflow::Tensor> results;
  const auto run = [&]() {
    results.clear();
    const absl::Status run_status =
        bundle.session->Run(feeds, fetches, {}, &results);
    if (!run_status.ok()) {
      Fail("signature '" + args.signature +
           "' failed: " + std::string(run_status.message()));
    }
  };
  for (int w = 0; w < args.warmup; ++w) run();
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < args.repeat; ++r) run();
  const std::chrono::duration<double> elapsed =
      std::chrono::steady_clock::now() - start;
  if (args.warmup > 0 || args.repeat > 1) {
    std::fprintf(stderr, "timing\trequests=%d\tseconds_per_request=%.6f\n",
                 args.repeat, elapsed.count() / args.repeat);
  }

  if (args.images.empty()) {
    for (size_t k = 0; k < keys.size(); ++k) {
      std::printf("%s\t%s\n", keys[k].c_str(), Joined(results[k]).c_str());
    }
    return 0;
  }
  const int64_t batch = args.shape[0];
  for (size_t k = 0; k < keys.size(); ++k) {
    if (results[k].dims() != 1 || results[k].dim_size(0) != batch) {
      Fail("output '" + keys[k] + "' has shape " +
           results[k].shape().DebugString() + ", expected [" +
           std::to_string(batch) + "]");
    }
  }
  for (int64_t i = 0; i < batch; ++i) {
    std::printf("%lld", static_cast<long long>(i));
    for (const tensorflow::Tensor& result : results) {
      std::printf("\t%s", Element(result, i).c_str());
    }
    std::printf("\n");
  }
  return 0;
}
