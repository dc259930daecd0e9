/**
 * gRPC server reflection, fed with the exact descriptors `buf build` wrote to gen/*.binpb.
 * (@grpc/reflection's usual proto-loader input serves regenerated descriptors that buf curl,
 * grpcurl and Python's DescriptorPool reject.)
 */
import { fromBinary, toBinary } from "@bufbuild/protobuf"
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt"
import { ReflectionService } from "@grpc/reflection"
import { existsSync, readFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

const descriptorFiles = ["messaging.binpb", "health.binpb"]

/** gen/ sits at the package root, whether this runs from src/ (tests) or dist/src/ (built). */
const findGenDirectory = (): string => {
  let dir = dirname(fileURLToPath(import.meta.url))
  while (!existsSync(join(dir, "gen", descriptorFiles[0]!))) {
    const parent = dirname(dir)
    if (parent === dir) throw new Error("gen/messaging.binpb not found above " + import.meta.url)
    dir = parent
  }
  return join(dir, "gen")
}

export const makeReflectionService = (): ReflectionService => {
  const gen = findGenDirectory()
  const byName = new Map<string, Buffer>()
  for (const file of descriptorFiles) {
    for (const descriptor of fromBinary(FileDescriptorSetSchema, readFileSync(join(gen, file))).file) {
      byName.set(descriptor.name, Buffer.from(toBinary(FileDescriptorProtoSchema, descriptor)))
    }
  }
  // @grpc/reflection reads only `fileDescriptorProtos` from the package definition.
  const definition = {
    __all_files__: { format: "Protocol Buffer 3 DescriptorProto", type: {}, fileDescriptorProtos: [...byName.values()] }
  } as unknown as ConstructorParameters<typeof ReflectionService>[0]
  return new ReflectionService(definition)
}
