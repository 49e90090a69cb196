// serving_check: runs one signature of a SavedModel through TensorFlow's C++
// loader, the loader TF Serving uses, with no Python involved.
//
// Usage:
//   serving_check --saved_model_dir=DIR --images=FILE --shape=N,H,W,C
//       [--signature=serving_default] [--input=images]
//       [--radii=FILE --radius_input=radius]
//       [--outputs=class,radius,p_lower] [--warmup=0] [--repeat=1]
//   serving_check --saved_model_dir=DIR --signature=metadata
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

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
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

Args ParseArgs(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
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
    } else {
      Fail("unknown flag --" + name);
    }
  }
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
