// popc_generate: greedy generation with a popc export from C++ (ONNX Runtime C++ API).
//
//   popc_generate DIR --ids 1,2,3 [--max-new-tokens N] [--oplib libpopc_ops.so]
//                 [--eos 2,3] [--pop-config 1,2,...] [--threads T]
//
// DIR is an export directory (DIR/model.onnx) or the .onnx file itself. --ids are the
// prompt's token ids (get them with `popc run DIR --prompt "..." --json`, field
// prompt_ids). Prints the generated ids on one line of stdout, space-separated; turn
// them into text with the export's tokenizer (see docs/op-library.md). Generation stops after N
// tokens or at an end-of-sequence id (from --eos, else popc.json's "eos_token_ids").
//
// Graph contract (what popc exports): inputs input_ids int64 [B, S], attention_mask
// int64 [B, past + S], and state inputs named past_* (KV cache past_key_values.{i}.key|value,
// POP state past_*), each fed back from the output of the same name with
// "past_key_values" -> "present" / "past_" -> "present_". Prefill feeds every state
// input empty: batch 1, its static dims, 0 for every other dynamic dim. An int64 input
// pop_config takes --pop-config; any other input is an error.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Args {
  std::string dir;
  std::vector<int64_t> ids;
  int max_new_tokens = 16;
  std::string oplib;
  std::vector<int64_t> eos;
  bool eos_given = false;
  std::vector<int64_t> pop_config;
  bool pop_config_given = false;
  int threads = 0;
};

[[noreturn]] void usage(const std::string& message) {
  std::cerr << "error: " << message << "\n"
            << "usage: popc_generate DIR --ids 1,2,3 [--max-new-tokens N] [--oplib PATH] [--eos IDS] "
               "[--pop-config VALUES] [--threads T]\n";
  std::exit(2);
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> out;
  std::string item;
  std::stringstream in(text);
  while (std::getline(in, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t\r\n[]"));
    item.erase(item.find_last_not_of(" \t\r\n[]") + 1);
    if (item.empty()) continue;
    try {
      size_t used = 0;
      out.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::exception&) {
      usage("not an integer list: " + text);
    }
  }
  return out;
}

Args parse_args(int argc, char** argv) {
  Args args;
  if (const char* env = std::getenv("POPC_OPLIB")) args.oplib = env;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--ids") args.ids = parse_ids(value());
    else if (a == "--max-new-tokens") args.max_new_tokens = std::atoi(value().c_str());
    else if (a == "--oplib") args.oplib = value();
    else if (a == "--eos") { args.eos = parse_ids(value()); args.eos_given = true; }
    else if (a == "--pop-config") { args.pop_config = parse_ids(value()); args.pop_config_given = true; }
    else if (a == "--threads") args.threads = std::atoi(value().c_str());
    else if (a == "-h" || a == "--help") usage("help requested");
    else if (!a.empty() && a[0] == '-') usage("unknown option " + a);
    else if (args.dir.empty()) args.dir = a;
    else usage("unexpected argument " + a);
  }
  if (args.dir.empty()) usage("give the export directory");
  if (args.ids.empty()) usage("give the prompt's token ids with --ids");
  if (args.max_new_tokens < 1) usage("--max-new-tokens must be >= 1");
  return args;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The integers of popc.json's "eos_token_ids": [...] (a tiny hand parse; no JSON library).
std::vector<int64_t> read_eos(const std::string& config_path) {
  std::ifstream in(config_path);
  if (!in) return {};
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string text = buffer.str();
  const size_t key = text.find("\"eos_token_ids\"");
  if (key == std::string::npos) return {};
  const size_t open = text.find('[', key), close = text.find(']', key);
  if (open == std::string::npos || close == std::string::npos || close < open) return {};
  return parse_ids(text.substr(open + 1, close - open - 1));
}

std::string present_name(const std::string& past) {
  const std::string kv = "past_key_values";
  if (past.compare(0, kv.size(), kv) == 0) return "present" + past.substr(kv.size());
  return "present_" + past.substr(5);  // past_X -> present_X
}

size_t element_count(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

int64_t argmax_last(const Ort::Value& logits) {
  auto info = logits.GetTensorTypeAndShapeInfo();
  const auto shape = info.GetShape();  // [1, S, V]
  const int64_t V = shape.back(), S = shape[shape.size() - 2];
  const size_t offset = static_cast<size_t>((S - 1) * V);
  int64_t best = 0;
  float best_value = 0;
  for (int64_t v = 0; v < V; ++v) {
    float x;
    if (info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      x = logits.GetTensorData<Ort::Float16_t>()[offset + v].ToFloat();
    else
      x = logits.GetTensorData<float>()[offset + v];
    if (v == 0 || x > best_value) best = v, best_value = x;  // first maximum, like numpy.argmax
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  const std::string model_path = ends_with(args.dir, ".onnx") ? args.dir : args.dir + "/model.onnx";
  const std::string dir = ends_with(args.dir, ".onnx") ? args.dir.substr(0, args.dir.find_last_of('/') + 1) : args.dir + "/";
  std::set<int64_t> eos;
  for (int64_t id : args.eos_given ? args.eos : read_eos(dir + "popc.json")) eos.insert(id);

  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "popc_generate");
    Ort::SessionOptions options;
    if (args.threads > 0) options.SetIntraOpNumThreads(args.threads);
    if (!args.oplib.empty()) {
      options.RegisterCustomOpsLibrary(args.oplib.c_str());  // the ai.popc kernels
      std::cerr << "registered " << args.oplib << "\n";
    } else {
      std::cerr << "note: no --oplib / POPC_OPLIB: popc ops run their ONNX function bodies (slower)\n";
    }
    Ort::Session session(env, model_path.c_str(), options);
    Ort::AllocatorWithDefaultOptions allocator;
    auto cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

    // Inputs: classify every one; state inputs start empty.
    std::vector<std::string> input_names;
    std::map<std::string, size_t> state_slot;  // past_* input -> index in `state`
    std::vector<Ort::Value> state;
    std::vector<std::string> state_outputs;
    std::string pop_config_name;
    std::vector<int64_t> pop_config_shape;
    for (size_t i = 0; i < session.GetInputCount(); ++i) {
      std::string name = session.GetInputNameAllocated(i, allocator).get();
      input_names.push_back(name);
      Ort::TypeInfo type_info = session.GetInputTypeInfo(i);  // owns what `type` views
      auto type = type_info.GetTensorTypeAndShapeInfo();
      if (name == "input_ids" || name == "attention_mask") continue;
      if (name.compare(0, 5, "past_") == 0) {
        std::vector<int64_t> shape = type.GetShape();
        for (size_t d = 0; d < shape.size(); ++d)
          if (d == 0) shape[d] = 1;  // batch
          else if (shape[d] < 0) shape[d] = 0;  // dynamic: empty at prefill
        state_slot[name] = state.size();
        state.push_back(Ort::Value::CreateTensor(allocator, shape.data(), shape.size(), type.GetElementType()));
        state_outputs.push_back(present_name(name));
        continue;
      }
      if (name == "pop_config") {
        if (!args.pop_config_given) throw std::runtime_error("the model has a pop_config input: pass --pop-config VALUES");
        pop_config_name = name;
        pop_config_shape = type.GetShape();
        continue;
      }
      throw std::runtime_error("the model has an input this program does not know: '" + name +
                               "' (known: input_ids, attention_mask, past_*, pop_config)");
    }
    // logits_to_keep: an input with a default (ORT lists it among the overridable
    // initializers); feeding 1 runs the LM head on the last position only at the prefill.
    bool keep_last_logits = false;
    for (size_t i = 0; i < session.GetOverridableInitializerCount(); ++i)
      if (std::string(session.GetOverridableInitializerNameAllocated(i, allocator).get()) == "logits_to_keep") {
        keep_last_logits = true;
        input_names.push_back("logits_to_keep");
      }
    std::vector<std::string> output_names;
    for (size_t i = 0; i < session.GetOutputCount(); ++i)
      output_names.push_back(session.GetOutputNameAllocated(i, allocator).get());
    if (output_names.empty() || output_names[0] != "logits")
      throw std::runtime_error("the model's first output is not 'logits'");
    std::map<std::string, size_t> output_index;
    for (size_t i = 0; i < output_names.size(); ++i) output_index[output_names[i]] = i;
    for (const auto& name : state_outputs)
      if (!output_index.count(name)) throw std::runtime_error("the model has no output '" + name + "' for its state");

    std::vector<const char*> in_ptrs, out_ptrs;
    for (auto& n : input_names) in_ptrs.push_back(n.c_str());
    for (auto& n : output_names) out_ptrs.push_back(n.c_str());

    std::vector<int64_t> step_ids = args.ids, mask(args.ids.size(), 1);
    std::vector<int64_t> pop_config = args.pop_config;
    if (!pop_config_name.empty() && pop_config_shape.empty() && pop_config.size() != 1)
      throw std::runtime_error("pop_config is a scalar: give one value");
    std::vector<int64_t> generated;
    int64_t one = 1;
    double prefill_ms = 0, decode_ms = 0;
    for (int step = 0; step < args.max_new_tokens; ++step) {
      const auto started = std::chrono::steady_clock::now();
      std::vector<Ort::Value> inputs;
      const int64_t ids_shape[2] = {1, static_cast<int64_t>(step_ids.size())};
      const int64_t mask_shape[2] = {1, static_cast<int64_t>(mask.size())};
      const int64_t cfg_shape[1] = {static_cast<int64_t>(pop_config.size())};
      for (const auto& name : input_names) {
        if (name == "input_ids")
          inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, step_ids.data(), step_ids.size(), ids_shape, 2));
        else if (name == "attention_mask")
          inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, mask.data(), mask.size(), mask_shape, 2));
        else if (keep_last_logits && name == "logits_to_keep")
          inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, &one, 1, nullptr, 0));
        else if (name == pop_config_name)
          inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, pop_config.data(), pop_config.size(), cfg_shape,
                                                             pop_config_shape.empty() ? 0 : 1));
        else
          inputs.push_back(std::move(state[state_slot[name]]));
      }
      auto outputs = session.Run(Ort::RunOptions{nullptr}, in_ptrs.data(), inputs.data(), inputs.size(),
                                 out_ptrs.data(), out_ptrs.size());
      const int64_t next = argmax_last(outputs[0]);
      for (size_t s = 0; s < state_outputs.size(); ++s) state[s] = std::move(outputs[output_index[state_outputs[s]]]);
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started).count();
      (step == 0 ? prefill_ms : decode_ms) += ms;
      generated.push_back(next);
      if (eos.count(next)) break;
      step_ids.assign(1, next);
      mask.push_back(1);
    }
    for (size_t i = 0; i < generated.size(); ++i) std::cout << (i ? " " : "") << generated[i];
    std::cout << std::endl;
    std::fprintf(stderr, "%zu prompt tokens, prefill %.1f ms; %zu new tokens, %.2f ms/token decode\n",
                 args.ids.size(), prefill_ms, generated.size(),
                 generated.size() > 1 ? decode_ms / (generated.size() - 1) : 0.0);
  } catch (const Ort::Exception& e) {
    std::cerr << "error: ONNX Runtime: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
