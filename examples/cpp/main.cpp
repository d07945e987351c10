// attnc_run: load an attnc engine.plan with the TensorRT C++ runtime, run it once on random
// inputs and print a summary of every output.
//
//   attnc_run ENGINE [--plugin-lib LIB.so]... [--shape NAME:1x3x224x224]...
//
// Plugins: engines built with TensorRT 10/11 embed attnc's fused ops as AOT plugins (PTX
// inside the plan), so nothing needs registering. An engine that uses plugins from a shared
// library (a C++ IPluginV3 library, e.g. for TensorRT-RTX) needs --plugin-lib, which loads
// it into the runtime's plugin registry before deserializing.
// Dynamic inputs take their shape from --shape, else the profile's opt shape.

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, char const* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
  }
};

#define CHECK_CUDA(call)                                                                    \
  do {                                                                                      \
    cudaError_t status_ = (call);                                                           \
    if (status_ != cudaSuccess) {                                                           \
      std::cerr << "CUDA error " << cudaGetErrorString(status_) << " at " << #call << "\n"; \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)

std::vector<char> readFile(std::string const& path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) {
    std::cerr << "cannot open " << path << "\n";
    std::exit(2);
  }
  std::vector<char> data(static_cast<size_t>(file.tellg()));
  file.seekg(0);
  file.read(data.data(), static_cast<std::streamsize>(data.size()));
  return data;
}

size_t elementSize(nvinfer1::DataType type) {
  switch (type) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kINT64: return 8;
    case nvinfer1::DataType::kINT8: return 1;
    case nvinfer1::DataType::kUINT8: return 1;
    case nvinfer1::DataType::kBOOL: return 1;
    default: return 0;
  }
}

// float -> the engine's input type, bit by bit (half/bf16 without cuda_fp16.h).
void storeAs(nvinfer1::DataType type, float value, char* out) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if (type == nvinfer1::DataType::kFLOAT) {
    std::memcpy(out, &value, 4);
  } else if (type == nvinfer1::DataType::kBF16) {
    uint16_t b = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    std::memcpy(out, &b, 2);
  } else if (type == nvinfer1::DataType::kHALF) {
    uint32_t sign = (bits >> 16) & 0x8000, exponent = (bits >> 23) & 0xFF, mantissa = bits & 0x7FFFFF;
    int e = static_cast<int>(exponent) - 127 + 15;
    uint16_t h = e <= 0 ? sign : e >= 31 ? (sign | 0x7C00) : (sign | (e << 10) | (mantissa >> 13));
    std::memcpy(out, &h, 2);
  } else {
    std::memset(out, 0, elementSize(type));
  }
}

float loadAs(nvinfer1::DataType type, char const* in) {
  if (type == nvinfer1::DataType::kFLOAT) {
    float f;
    std::memcpy(&f, in, 4);
    return f;
  }
  if (type == nvinfer1::DataType::kBF16 || type == nvinfer1::DataType::kHALF) {
    uint16_t h;
    std::memcpy(&h, in, 2);
    uint32_t bits;
    if (type == nvinfer1::DataType::kBF16) {
      bits = static_cast<uint32_t>(h) << 16;
    } else {
      uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
      bits = exponent == 0 ? sign : exponent == 31 ? (sign | 0x7F800000 | (mantissa << 13))
                                                   : (sign | ((exponent - 15 + 127) << 23) | (mantissa << 13));
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  if (type == nvinfer1::DataType::kINT32) return static_cast<float>(*reinterpret_cast<int32_t const*>(in));
  if (type == nvinfer1::DataType::kINT64) return static_cast<float>(*reinterpret_cast<int64_t const*>(in));
  return static_cast<float>(*reinterpret_cast<uint8_t const*>(in));
}

std::string shapeString(nvinfer1::Dims const& dims) {
  std::ostringstream out;
  for (int32_t i = 0; i < dims.nbDims; ++i) out << (i ? "x" : "") << dims.d[i];
  return out.str();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " ENGINE [--plugin-lib LIB.so]... [--shape NAME:1x3x224x224]...\n";
    return 2;
  }
  std::string enginePath = argv[1];
  std::vector<std::string> pluginLibs;
  std::map<std::string, std::vector<int64_t>> shapes;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--plugin-lib") {
      pluginLibs.push_back(value);
    } else if (flag == "--shape") {
      auto colon = value.rfind(':');
      std::vector<int64_t> dims;
      std::stringstream dimsText(value.substr(colon + 1));
      for (std::string d; std::getline(dimsText, d, 'x');) dims.push_back(std::stoll(d));
      shapes[value.substr(0, colon)] = dims;
    } else {
      std::cerr << "unknown flag " << flag << "\n";
      return 2;
    }
  }

  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
  for (auto const& lib : pluginLibs) {
    if (!runtime->getPluginRegistry().loadLibrary(lib.c_str())) {
      std::cerr << "cannot load plugin library " << lib << "\n";
      return 1;
    }
  }
  std::vector<char> plan = readFile(enginePath);
  std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
  if (!engine) {
    std::cerr << "cannot deserialize " << enginePath
              << " (built by another TensorRT version, for another GPU, or a plugin is missing)\n";
    return 1;
  }
  std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<void*> buffers;

  // Inputs first: their shapes decide the output shapes.
  int32_t const nbTensors = engine->getNbIOTensors();
  for (int32_t i = 0; i < nbTensors; ++i) {
    char const* name = engine->getIOTensorName(i);
    if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kINPUT) continue;
    nvinfer1::Dims dims = engine->getTensorShape(name);
    nvinfer1::Dims opt = engine->getProfileShape(name, 0, nvinfer1::OptProfileSelector::kOPT);
    for (int32_t d = 0; d < dims.nbDims; ++d) {
      if (dims.d[d] < 0) dims.d[d] = shapes.count(name) ? shapes[name][d] : opt.d[d];
    }
    context->setInputShape(name, dims);
    nvinfer1::DataType type = engine->getTensorDataType(name);
    size_t count = 1;
    for (int32_t d = 0; d < dims.nbDims; ++d) count *= static_cast<size_t>(dims.d[d]);
    std::vector<char> host(count * elementSize(type));
    for (size_t e = 0; e < count; ++e) storeAs(type, normal(rng), host.data() + e * elementSize(type));
    void* device = nullptr;
    CHECK_CUDA(cudaMalloc(&device, host.size()));
    CHECK_CUDA(cudaMemcpyAsync(device, host.data(), host.size(), cudaMemcpyHostToDevice, stream));
    context->setTensorAddress(name, device);
    buffers.push_back(device);
    std::cout << "input  " << name << " " << shapeString(dims) << "\n";
  }

  std::vector<std::pair<std::string, std::vector<char>>> outputs;
  std::vector<void*> outputDevice;
  for (int32_t i = 0; i < nbTensors; ++i) {
    char const* name = engine->getIOTensorName(i);
    if (engine->getTensorIOMode(name) != nvinfer1::TensorIOMode::kOUTPUT) continue;
    nvinfer1::Dims dims = context->getTensorShape(name);
    size_t count = 1;
    for (int32_t d = 0; d < dims.nbDims; ++d) count *= static_cast<size_t>(dims.d[d]);
    size_t bytes = std::max<size_t>(count * elementSize(engine->getTensorDataType(name)), 1);
    void* device = nullptr;
    CHECK_CUDA(cudaMalloc(&device, bytes));
    context->setTensorAddress(name, device);
    buffers.push_back(device);
    outputDevice.push_back(device);
    outputs.emplace_back(name, std::vector<char>(bytes));
  }

  if (!context->enqueueV3(stream)) {
    std::cerr << "enqueueV3 failed\n";
    return 1;
  }
  for (size_t o = 0; o < outputs.size(); ++o) {
    CHECK_CUDA(cudaMemcpyAsync(outputs[o].second.data(), outputDevice[o], outputs[o].second.size(),
                               cudaMemcpyDeviceToHost, stream));
  }
  CHECK_CUDA(cudaStreamSynchronize(stream));

  for (auto const& [name, host] : outputs) {
    nvinfer1::DataType type = engine->getTensorDataType(name.c_str());
    size_t size = elementSize(type), count = host.size() / size;
    double sum = 0, sumAbs = 0;
    for (size_t e = 0; e < count; ++e) {
      float v = loadAs(type, host.data() + e * size);
      sum += v;
      sumAbs += std::abs(v);
    }
    std::cout << "output " << name << " " << shapeString(context->getTensorShape(name.c_str())) << " first "
              << loadAs(type, host.data()) << " mean " << sum / count << " mean|x| " << sumAbs / count << "\n";
  }
  for (void* buffer : buffers) CHECK_CUDA(cudaFree(buffer));
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
